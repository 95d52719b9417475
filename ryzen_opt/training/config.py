"""``TrainingConfig``: the validated settings of :func:`ryzen_opt.optimize_training`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ryzen_opt.optimization.config import DEFAULT_TOLERANCE, OptimizeConfig


@dataclass
class TrainingConfig:
    """Settings of :func:`ryzen_opt.optimize_training`.

    Args:
        candidates: the candidate names to try (``None``: every one that runs on the model's
            device; see :data:`ryzen_opt.training.candidates.CANDIDATES`).
        force: candidates installed once they pass the gradient check, without the speed
            requirement (their timing is skipped; the report marks them "forced"): for
            tests and numerics studies of a kernel, never for a speed claim.
        tolerance: relative error allowed per dtype name for the loss and every gradient.
        repeat: interleaved timing samples per side (each sample is whole training steps).
        warmup: untimed steps per side first (JIT compilation, autotuning, the allocator).
        min_sample_s: each timing sample lasts at least this long.
        min_speedup: the median speed-up of the step must also reach this.
        confidence: level of the bootstrap interval on the speed-up.
        model_check: time the whole optimized step against the original once more and
            return the model unchanged if it is slower or its gradients differ.
        use_cache: read and write ``optimize()``'s decision cache (keyed by device,
            versions, model and batch shape).
        cache_dir: the cache folder (``None``: ``optimize()``'s default).
        chunk_size: rows per chunk of the fused linear + cross-entropy (``None``: sized by
            the vocabulary).
        ignore_index: the label of positions without a loss.
        check_rows: rows of the example batch the gradient checks run on (the timing
            always takes the whole batch). ``None``: every row in float32; in 16-bit dtypes
            a quarter of them (at least one), as the check there also runs a float32 copy
            of the model whose activations take twice the step's memory.

    Example:
        >>> from ryzen_opt.training import TrainingConfig
        >>> TrainingConfig(repeat=5).to_dict()["repeat"]
        5
    """

    candidates: tuple[str, ...] | None = None
    force: tuple[str, ...] = ()
    # DESIGN.md rule 2 (fp32 1e-4: every candidate reorders a reduction; bf16/fp16 1e-2).
    tolerance: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    # A step is 10-300 ms on 2 cores, so 10 samples a side keep the selection under a minute
    # for the seed model; the bootstrap interval of a 10% effect still excludes 1.
    repeat: int = 10
    warmup: int = 2
    min_sample_s: float = 2e-3
    min_speedup: float = 1.05
    confidence: float = 0.95
    model_check: bool = True
    # Off by default: a training run measures once, and a stale decision would be reused
    # across library upgrades that the key does not see (custom kernels built elsewhere).
    use_cache: bool = False
    cache_dir: str | Path | None = None
    chunk_size: int | None = None
    ignore_index: int = -100
    check_rows: int | None = None

    def __post_init__(self) -> None:
        from ryzen_opt.training.candidates import CANDIDATES

        for name in ("candidates", "force"):
            v = getattr(self, name)
            if v is None and name == "candidates":
                continue
            if isinstance(v, str) or not all(isinstance(x, str) for x in v):
                raise ValueError(f"{name} must be a sequence of candidate names, got {v!r}")
            unknown = [x for x in v if x not in CANDIDATES]
            if unknown:
                raise ValueError(
                    f"{name} names unknown candidates {unknown}; known: {sorted(CANDIDATES)}"
                )
            setattr(self, name, tuple(v))
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")
        c = self.chunk_size
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {c!r}")
        r = self.check_rows
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"check_rows must be None or an int >= 1, got {r!r}")
        # the shared fields are validated (and their errors worded) by OptimizeConfig
        self.optimize_config()

    def optimize_config(self) -> OptimizeConfig:
        """The :class:`OptimizeConfig` that ``optimize()``'s measuring engine reads."""
        return OptimizeConfig(
            tolerance=dict(self.tolerance),
            repeat=self.repeat,
            warmup=self.warmup,
            min_sample_s=self.min_sample_s,
            min_speedup=self.min_speedup,
            confidence=self.confidence,
            model_check=self.model_check,
            use_cache=self.use_cache,
            cache_dir=self.cache_dir,
            fast_paths=(),
            time_budget_s=None,
            progress=False,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (for the report)."""
        d = dataclasses.asdict(self)
        d["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        for k in ("candidates", "force"):
            d[k] = None if d[k] is None else list(d[k])
        return d
