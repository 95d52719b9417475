"""``SamplingConfig``: how the n candidates of best-of-n are drawn, validated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of :class:`~ryzen_opt.scaling.InferenceScalingEngine`.

    Args:
        temperature: softmax temperature; 0 is greedy (every candidate is then the same, so
            best-of-n gains nothing).
        top_k: keep only the ``top_k`` most likely tokens, or ``None``.
        top_p: nucleus threshold in (0, 1], or ``None``.
        seed: candidate ``j`` of prompt ``i`` draws its randomness from ``(seed, i, j)`` only,
            so results do not depend on how candidates are batched.
        eos_id: the end-of-sequence id; ``None`` takes the verifier tokenizer's EOS.
        stop_at_eos: a candidate stops decoding once it produced EOS (per-row stopping);
            ``False`` decodes every candidate for ``max_new_tokens`` (the completion text
            still ends at the first EOS).

    Example:
        >>> SamplingConfig(temperature=0.8, top_k=8, seed=3).to_dict()["top_k"]
        8
    """

    # 1.0: the model's own distribution; lower values trade coverage for pass@1.
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    eos_id: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
            raise ValueError(f"temperature must be a finite float >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (
            isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1
        ):
            raise ValueError(f"top_p must be None or a float in (0, 1], got {p!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.eos_id is not None and (not _is_int(self.eos_id) or self.eos_id < 0):
            raise ValueError(f"eos_id must be None or an int >= 0, got {self.eos_id!r}")
        if not isinstance(self.stop_at_eos, bool):
            raise ValueError(f"stop_at_eos must be a bool, got {self.stop_at_eos!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (for reports and JSON)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SamplingConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
