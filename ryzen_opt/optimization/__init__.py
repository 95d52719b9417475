"""Internals of :func:`ryzen_opt.optimize`: config, sites, replacement modules, report, cache.

The public names are re-exported by the front door, ``optimize()`` and ``KernelOptimizer``
(nothing here imports it back), which drives :mod:`.engine`, the measuring engine. ``python -m
ryzen_opt.optimization`` optimizes the reference model on this machine and prints the report.
"""

from ryzen_opt.optimization import cache, config, hf, modules, report, sites  # noqa: F401
from ryzen_opt.optimization.config import OptimizeConfig
from ryzen_opt.optimization.report import OptimizationReport

__all__ = ["OptimizationReport", "OptimizeConfig"]
