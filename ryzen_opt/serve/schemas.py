"""Request and response bodies of the HTTP API (pydantic), validated strictly.

Strict types: a number is not a string and ``"1"`` is not a number, so a client's type
mistake is an error that names the field, never a silent coercion. Unknown fields are
refused too (a misspelt ``max_new_token`` must not fall back to the default quietly).
"""

from __future__ import annotations

import unicodedata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from ryzen_opt.scaling.selection import STRATEGIES

Strategy = Literal[STRATEGIES]  # type: ignore[valid-type]
AUTO = "auto"  # the adapter value that asks the skill router (or the weight experts) to choose
EXPERT_PREFIX = "expert:"  # how a response names the weight expert "auto" chose


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AdapterGenerateRequest(_Body):
    """``POST /adapters/generate``: a task described in words -> a new adapter."""

    description: StrictStr = Field(description="what the adapter should do, in words")
    seed: StrictInt = Field(0, ge=0, le=2**31 - 1, description="the generator's seed")


class AdapterInfo(BaseModel):
    """One served adapter, as ``GET /adapters`` and ``POST /adapters/generate`` show it."""

    id: str
    source: Literal["folder", "generated"]
    rank: int
    alpha: float
    target_modules: list[str]
    parameters: int = Field(description="trainable parameters of the adapter (A and B)")
    description: str | None = None
    seed: int | None = None
    generate_ms: float | None = Field(None, description="time the generator took")


class AdapterGenerateResponse(AdapterInfo):
    """The new adapter; ``cached`` is true when this description and seed were seen before
    (generation is deterministic, so the earlier adapter is returned)."""

    cached: bool = False


class AdapterList(BaseModel):
    """``GET /adapters``."""

    adapters: list[AdapterInfo]
    generator: bool = Field(description="POST /adapters/generate has a generator")
    router: bool = Field(description='adapter="auto" has a skill router')


class GenerateRequest(_Body):
    """``POST /generate``.

    Give at most one of ``adapter`` (a registered id, or ``"auto"`` to let the skill router
    pick) and ``description`` (an adapter is generated, or reused, for it). Neither: the
    base model.
    """

    prompt: StrictStr
    adapter: StrictStr | None = None
    description: StrictStr | None = None
    seed: StrictInt = Field(0, ge=0, le=2**31 - 1, description="sampling and generator seed")
    max_new_tokens: StrictInt | None = Field(None, ge=1)
    n: StrictInt = Field(1, ge=1, description="best-of-n candidates (InferenceScalingEngine)")
    temperature: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="default: 0 (greedy) for n=1, 1.0 for n>1"
    )
    top_k: StrictInt | None = Field(None, ge=1)
    strategy: Strategy | None = Field(None, description="best-of-n selection (n > 1)")
    stream: StrictBool = Field(False, description="server-sent events, one per token (n=1)")

    @model_validator(mode="after")
    def _one_source(self) -> GenerateRequest:
        if self.adapter is not None and self.description is not None:
            raise ValueError("give adapter or description, not both")
        if self.stream and self.n != 1:
            raise ValueError("stream=true needs n=1 (best-of-n returns one chosen completion)")
        if self.strategy is not None and self.n == 1:
            raise ValueError("strategy needs n > 1")
        return self


class CandidateInfo(BaseModel):
    """One best-of-n candidate."""

    completion: str
    verified: bool
    mean_logprob: float


class BestOfN(BaseModel):
    """What best-of-n chose and from what."""

    strategy: str
    index: int
    candidates: list[CandidateInfo]


class Timing(BaseModel):
    """Milliseconds: waiting for the model, running on it, the whole request."""

    queue_ms: float
    run_ms: float
    total_ms: float


class GenerateResponse(BaseModel):
    """``POST /generate`` without streaming."""

    adapter: str | None = Field(description="the adapter that served (None: the base model)")
    routed: bool = Field(description='the adapter was chosen by the skill router ("auto")')
    prompt: str
    completion: str
    token_ids: list[int] = Field(description="generated ids, EOS included when produced")
    finish_reason: Literal["eos", "length"]
    best_of: BestOfN | None = None
    timing: Timing


def check_description(text: str, max_chars: int) -> str:
    """``text`` stripped, or ValueError saying why it is not a usable description.

    A description is words: non-empty after stripping, at most ``max_chars`` characters,
    no control characters other than whitespace, and at least one letter or digit.
    """
    s = text.strip()
    if not s:
        raise ValueError("description is empty")
    if len(s) > max_chars:
        raise ValueError(f"description has {len(s)} characters, more than the {max_chars} allowed")
    bad = sorted({c for c in s if unicodedata.category(c)[0] == "C" and c not in "\t\n\r"})
    if bad:
        shown = ", ".join(f"U+{ord(c):04X}" for c in bad[:5])
        raise ValueError(f"description is not text: it holds control characters ({shown})")
    if not any(c.isalnum() for c in s):
        raise ValueError("description is not text: it has no letter or digit")
    return s
