"""Programmatic verifiers: a task's checker plus the tokenizer that turns ids into text."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class TaskVerifier:
    """A programmatic checker of completions, with the tokenizer that reads them.

    Args:
        verify: ``verify(prompt_text, completion_text) -> bool``, the ground-truth checker.
        tokenizer: ``encode(text) -> ids`` (prompts, BOS included) and ``decode(ids) -> text``
            (stops at EOS).
        extract_answer: ``extract_answer(completion_text) -> str | None``, the final answer
            a completion states (for voting); default: the stripped completion text.
        eos_id: the end-of-sequence id; default: ``tokenizer.EOS`` if it has one.

    Example:
        >>> from ryzen_opt.models import ArithmeticTask
        >>> v = TaskVerifier.from_task(ArithmeticTask(digits=2))
        >>> v.verify("12+30=", "42"), v.eos_id
        (True, 2)
    """

    def __init__(
        self,
        verify: Callable[[str, str], bool],
        tokenizer: Tokenizer,
        extract_answer: Callable[[str], str | None] | None = None,
        eos_id: int | None = None,
    ) -> None:
        if not callable(verify):
            raise TypeError(f"verify must be callable, got {type(verify).__name__}")
        if not (
            callable(getattr(tokenizer, "encode", None))
            and callable(getattr(tokenizer, "decode", None))
        ):
            raise TypeError("tokenizer must have encode(text) and decode(ids) methods")
        if extract_answer is not None and not callable(extract_answer):
            raise TypeError("extract_answer must be None or callable")
        self._verify = verify
        self.tokenizer = tokenizer
        self._extract = extract_answer
        eos = getattr(tokenizer, "EOS", None) if eos_id is None else eos_id
        self.eos_id: int | None = None if eos is None else int(eos)

    @classmethod
    def from_task(cls, task: Any) -> TaskVerifier:
        """Wrap a task object with ``verify``, ``extract_answer`` and ``tokenizer``.

        Args:
            task: e.g. :class:`~ryzen_opt.models.ArithmeticTask`.

        Returns:
            The verifier.
        """
        for name in ("verify", "tokenizer"):
            if not hasattr(task, name):
                raise TypeError(f"verifier task must have .{name}, {type(task).__name__} has not")
        return cls(task.verify, task.tokenizer, getattr(task, "extract_answer", None))

    def verify(self, prompt: str, completion: str) -> bool:
        """The checker's verdict on ``completion`` for ``prompt``."""
        return bool(self._verify(prompt, completion))

    def extract_answer(self, completion: str) -> str | None:
        """The answer ``completion`` states (``None``: it states none)."""
        if self._extract is None:
            text = completion.strip()
            return text or None
        return self._extract(completion)

    def encode(self, prompt: str) -> list[int]:
        """Ids of a prompt text."""
        return list(self.tokenizer.encode(prompt))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ids (a completion stops at EOS)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids))


def as_verifier(obj: Any) -> TaskVerifier:
    """``obj`` itself if it is a :class:`TaskVerifier`, else :meth:`TaskVerifier.from_task`.

    Args:
        obj: a TaskVerifier or a task with ``verify``/``extract_answer``/``tokenizer``.

    Returns:
        A TaskVerifier.
    """
    if isinstance(obj, TaskVerifier):
        return obj
    return TaskVerifier.from_task(obj)
