"""``optimize(model)`` and ``KernelOptimizer``: measured, verified kernel selection.

Not implemented yet: every entry point raises ``NotImplementedError`` rather than return a
model that was not checked and timed.
"""

from __future__ import annotations

from dataclasses import dataclass

_MSG = (
    "optimize()/KernelOptimizer are not implemented in this version of ryzen_opt; "
    "the model is returned by nobody rather than returned unchecked"
)


@dataclass
class OptimizeConfig:
    """Settings of :class:`KernelOptimizer` (placeholder until the optimizer lands)."""


class KernelOptimizer:
    """Finds a model's matmuls, attention and norms and swaps in faster verified kernels."""

    def __init__(self, config: OptimizeConfig | None = None) -> None:
        raise NotImplementedError(_MSG)


def optimize(model, example_inputs=None, **kwargs):
    """Return an optimized copy of ``model`` (not implemented yet: raises)."""
    raise NotImplementedError(_MSG)
