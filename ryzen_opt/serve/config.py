"""What ``create_app`` is given: the generator and router protocols, limits, best-of-n."""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch


class AdapterFactory(Protocol):
    """Makes an adapter from a description: ``factory(description, seed) -> folder``.

    The folder holds a PEFT-format LoRA adapter for the served base model
    (``adapter_config.json`` + ``adapter_model.safetensors``). Same description and seed,
    same adapter. It is called from one thread at a time (not the model worker's) and must
    not change the served model; a ``ValueError`` it raises is shown to the client as a 422.
    """

    def __call__(self, description: str, seed: int) -> Path: ...


class SkillRouter(Protocol):
    """Chooses an adapter for a prompt: ``router(prompt) -> registered id or None``.

    ``None`` means the base model. It runs on the model worker thread, inside the request's
    job, so it may run the model (a first pass) with any adapter active; the registry then
    switches to the adapter it names.
    """

    def __call__(self, prompt: str) -> str | None: ...


class WeightExperts(Protocol):
    """``adapter="auto"`` by weight experts (e.g. :class:`~ryzen_opt.adapters.SVFExperts`).

    Both methods run on the model worker thread, inside the request's job, with the registry
    serving the base weights: ``identify(prompt)`` names the expert the prompt needs (a first
    pass of the model), and within ``applied(name)`` (a context manager) the served model
    holds that expert's weights, restored exactly on exit. The response names the expert as
    ``"expert:<name>"``.
    """

    def identify(self, prompt: str) -> str: ...

    def applied(self, name: str) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class ServeConfig:
    """Limits of the HTTP API.

    Args:
        max_description_chars: longest description accepted (after stripping).
        default_max_new_tokens: ``max_new_tokens`` when a request gives none.
        max_n: largest best-of-n a request may ask for.
    """

    # 1000: a paragraph; a description is a sentence or two, and the generator's cost grows
    # with its length.
    max_description_chars: int = 1000
    # 16: the longest answer of the 4-digit arithmetic tasks is 9 tokens with EOS.
    default_max_new_tokens: int = 16
    # 64: best-of-64 of a 128-token context is 64 decode rows, still one batch on the CPU.
    max_n: int = 64

    def __post_init__(self) -> None:
        for name in ("max_description_chars", "default_max_new_tokens", "max_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")


class HTTPError(Exception):
    """An error answered with ``status`` and ``{"detail": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_ARITH = re.compile(r"^(\d+)([+\-*])(\d+)=$")


def arithmetic_verify(prompt: str, completion: str) -> bool:
    """True iff ``completion`` is the answer of an ``"a op b="`` prompt (any digit count).

    Prompts of another form have no verdict (False), so best-of-n falls back to the
    candidates' likelihood for them.
    """
    m = _ARITH.match(prompt)
    if m is None:
        return False
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    want = a + b if op == "+" else a - b if op == "-" else a * b
    return completion.strip() == str(want)


def default_scaling_engine(model: torch.nn.Module, tokenizer: Any):
    """An :class:`~ryzen_opt.scaling.InferenceScalingEngine` over ``model`` that verifies
    arithmetic prompts of any digit count (:func:`arithmetic_verify`)."""
    from ryzen_opt.models.tasks import ArithmeticTask
    from ryzen_opt.scaling import InferenceScalingEngine, TaskVerifier

    verifier = TaskVerifier(arithmetic_verify, tokenizer, ArithmeticTask.extract_answer)
    return InferenceScalingEngine(model, verifier)
