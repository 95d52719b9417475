"""The launch shape shared by the element-wise training ops (SwiGLU, GELU).

A ``(rows, n)`` view with unit last stride is covered by a 1-D grid of ``rows * cdiv(n,
BLOCK)`` programs, each reading BLOCK contiguous elements of one row. Contiguous inputs are
one row of ``numel`` elements; a non-contiguous view (``gate, up = proj.chunk(2, -1)``) keeps
its row stride and is not copied.
"""

from __future__ import annotations

from ryzen_opt.kernels.triton import _common

# 1024 elements (4 per thread over 4 warps): element-wise kernels are bandwidth-bound and
# this is the Triton tutorial's vector-add block, which reaches the copy rate on Hopper.
BLOCK = 1024
NUM_WARPS = 4


def grid(n_rows: int, n: int) -> tuple[int]:
    return (n_rows * _common.cdiv(n, BLOCK),)
