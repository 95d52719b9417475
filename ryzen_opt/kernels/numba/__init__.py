"""Numba CPU kernels: matmul, attention, decode_attention, layer_norm (one module each).

Importing an op module registers it with :mod:`ryzen_opt.kernels.registry`. Every kernel is
compiled with ``cache=True``, so the first call in a fresh clone pays the JIT (seconds per
kernel) and later processes load machine code from ``__pycache__``. :func:`warmup` pays that
cost up front, e.g. before timing a model.
"""

from __future__ import annotations

import time

__all__ = ["warmup"]

_OPS = ("matmul", "attention", "decode_attention", "layer_norm")


def warmup(ops: tuple[str, ...] = _OPS) -> float:
    """Compile (or load from the disk cache) every kernel signature the ops use.

    The kernels have one signature each (launchers pass contiguous float32 arrays and fold
    options into runtime flags), so one tiny call per op covers every model shape.

    Args:
        ops: which ops to compile, any of ``matmul``, ``attention``, ``decode_attention``,
            ``layer_norm``.

    Returns:
        Seconds spent, i.e. the compile (or cache load) time.

    Example:
        >>> seconds = warmup(("layer_norm",))
    """
    import torch

    unknown = [op for op in ops if op not in _OPS]
    if unknown:
        raise ValueError(f"ops must be a subset of {_OPS}, got {unknown}")
    t0 = time.perf_counter()
    if "matmul" in ops:
        from ryzen_opt.kernels.numba.matmul import matmul

        matmul(torch.ones(4, 3), torch.ones(3, 5), torch.ones(5), "gelu", torch.ones(4, 5))
    if "attention" in ops:
        from ryzen_opt.kernels.numba.attention import attention

        attention(torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4), True)
    if "decode_attention" in ops:
        from ryzen_opt.kernels.numba.decode_attention import decode_attention

        decode_attention(
            torch.ones(1, 2, 4), torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4), torch.tensor([2])
        )
    if "layer_norm" in ops:
        from ryzen_opt.kernels.numba.layer_norm import layer_norm

        layer_norm(torch.ones(2, 4), torch.ones(4), torch.zeros(4), 1e-5, torch.ones(2, 4))
    return time.perf_counter() - t0
