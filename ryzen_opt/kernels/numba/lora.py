"""Numba CPU mixed-batch LoRA (BGMV): row ``r`` adds ``scales[i] * B[i] @ (A[i] @ x[r])``.

Rows are grouped by adapter first (a counting sort of ``indices``, O(rows)); each task is
one adapter and up to ``ROWS_PER_TASK`` of its rows, so A[i] and B[i] are read once per task
rather than once per row:

* shrink ``t = scale * x A^T`` (rank wide): a 3x3 block of dot products (three rows against
  three A rows over ``in_features``, ``_common._dot3x3``), 1x4 blocks for the rows left over;
* expand ``y = t B^T``: the dot runs over ``rank`` (16 floats), too short for the loop
  vectorizer, so groups of ``TILE_ROWS`` or more go through the packed-GEMM register tile
  (``_common._fma_rows_tile``: six B rows read in place against ``t^T`` packed as one
  panel) and smaller groups (decode rows of a mixed batch) through 1x4 dot blocks.

PEFT's layouts are used as they are: no weight is transposed or copied per call. Tasks run in
a ``prange`` when there are at least two and enough work; otherwise serially (waking the
OpenMP pool costs more than a small call: see ``numba/NOTES.md``).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ryzen_opt.kernels import reference, registry
from ryzen_opt.kernels.numba._common import (
    JIT,
    MR,
    NR,
    _dot1x4,
    _dot3x3,
    _fma_rows_tile,
    as_array,
    available,
    cpu_fp32_reason,
    set_threads,
)

# Rows of one adapter per task: the register tile's width (NR = 16 token rows).
ROWS_PER_TASK = NR
# Groups of at least this many rows expand through the MR x NR register tile, smaller ones
# through 1x4 dot blocks. Measured (2048 outputs, rank 16, one core): 1x4 dots 2.9 us a row;
# the tile ~12 us for any group up to 6 rows (it computes all 16 columns), 23.6 us for 15.
TILE_ROWS = 8
# Serial below this many multiply-adds (rows * rank * (in + out)).
SERIAL_BELOW = 1 << 18


@njit(**JIT)
def _plan(idx, n_adapters, rows_per_task):
    """Rows grouped by adapter and the task list.

    Returns ``order`` (row numbers, adapter by adapter, rows without an adapter last) and
    ``tasks`` of ``(adapter, lo, hi)``: rows ``order[lo:hi]`` use ``adapter`` (-1: none).
    """
    rows = idx.shape[0]
    counts = np.zeros(n_adapters + 1, dtype=np.int64)
    for r in range(rows):
        counts[idx[r] + 1] += 1
    starts = np.empty(n_adapters + 1, dtype=np.int64)
    pos = 0
    for s in range(1, n_adapters + 1):  # adapters first, then slot 0 (no adapter)
        starts[s] = pos
        pos += counts[s]
    starts[0] = pos
    order = np.empty(rows, dtype=np.int64)
    fill = starts.copy()
    for r in range(rows):
        s = idx[r] + 1
        order[fill[s]] = r
        fill[s] += 1
    n_tasks = 0
    for s in range(n_adapters + 1):
        n_tasks += (counts[s] + rows_per_task - 1) // rows_per_task
    tasks = np.empty((n_tasks, 3), dtype=np.int64)
    t = 0
    for s in range(n_adapters + 1):
        for lo in range(starts[s], starts[s] + counts[s], rows_per_task):
            tasks[t, 0] = s - 1
            tasks[t, 1] = lo
            tasks[t, 2] = min(lo + rows_per_task, starts[s] + counts[s])
            t += 1
    return order, tasks


@njit(**JIT)
def _put(out, row, n, v, accumulate):
    if accumulate:
        out[row, n] += v
    else:
        out[row, n] = v


@njit(**JIT)
def _task(x, a, b, scales, order, tasks, out, accumulate, task):
    """Shrink then expand for the rows of one task (see the module docstring)."""
    ad, lo, hi = tasks[task, 0], tasks[task, 1], tasks[task, 2]
    n_out = out.shape[1]
    if ad < 0:
        if not accumulate:
            for p in range(lo, hi):
                out[order[p], :] = 0.0
        return
    aw, bw = a[ad], b[ad]
    rank, n_in = aw.shape[0], aw.shape[1]
    g = hi - lo
    g3 = g // 3 * 3
    t = np.empty((g, rank), dtype=np.float32)
    s = np.float32(scales[ad])
    kl, nl = rank - 1, n_out - 1
    # Shrink: t[u, k] = x[row_u] . A[k] over in_features.
    for u in range(0, g3, 3):
        x0, x1, x2 = x[order[lo + u]], x[order[lo + u + 1]], x[order[lo + u + 2]]
        for k in range(0, rank, 3):
            d = _dot3x3(x0, x1, x2, aw[k], aw[min(k + 1, kl)], aw[min(k + 2, kl)], n_in)
            for w in range(min(3, rank - k)):
                t[u, k + w] = d[w] * s
                t[u + 1, k + w] = d[3 + w] * s
                t[u + 2, k + w] = d[6 + w] * s
    for u in range(g3, g):
        xr = x[order[lo + u]]
        for k in range(0, rank, 4):
            d = _dot1x4(xr, aw[k], aw[min(k + 1, kl)], aw[min(k + 2, kl)], aw[min(k + 3, kl)], n_in)
            for w in range(min(4, rank - k)):
                t[u, k + w] = d[w] * s
    if g >= TILE_ROWS:
        _expand_tile(t, bw, order[lo:hi], out, accumulate)
        return
    # Expand: y[row_u, n] = t[u] . B[n] over rank.
    for u in range(g):
        r = order[lo + u]
        tr = t[u]
        for n in range(0, n_out, 4):
            d = _dot1x4(tr, bw[n], bw[min(n + 1, nl)], bw[min(n + 2, nl)], bw[min(n + 3, nl)], rank)
            for w in range(min(4, n_out - n)):
                _put(out, r, n + w, d[w], accumulate)


@njit(**JIT)
def _expand_tile(t, bw, rows, out, accumulate):
    """``out[rows[j], n] (+)= t[j] . B[n]`` for up to NR rows through the register tile.

    ``yt = B t^T`` (out_features x NR): B's rows are read in place, MR at a time, against
    ``t^T`` packed into one (rank x NR) panel; the MR rows left at the end go through a
    zero-padded copy. The result is staged in ``yt`` and scattered at the end: storing
    straight into ``out`` writes NR rows 8 KiB apart (at 2048 outputs), which share one L1
    set, and made the 15-row expand 6.7x slower (159 vs 23.6 us).
    """
    g, rank = t.shape
    n_out = bw.shape[0]
    bp = np.zeros(rank * NR, dtype=np.float32)
    for j in range(g):
        for k in range(rank):
            bp[k * NR + j] = t[j, k]
    yt = np.empty((n_out + MR, NR), dtype=np.float32)
    flat = bw.reshape(-1)
    full = n_out // MR * MR
    for i0 in range(0, full, MR):
        _fma_rows_tile(flat, i0 * rank, rank, bp, rank, yt[i0:].reshape(-1))
    if full < n_out:
        tail = np.zeros(MR * rank, dtype=np.float32)
        for i in range(n_out - full):
            for k in range(rank):
                tail[i * rank + k] = bw[full + i, k]
        _fma_rows_tile(tail, 0, rank, bp, rank, yt[full:].reshape(-1))
    for j in range(g):
        r = rows[j]
        for n in range(n_out):
            _put(out, r, n, yt[n, j], accumulate)


@njit(parallel=True, **JIT)
def _bgmv_parallel(x, a, b, scales, order, tasks, out, accumulate):
    for task in prange(tasks.shape[0]):
        _task(x, a, b, scales, order, tasks, out, accumulate, task)


@njit(**JIT)
def _bgmv_serial(x, a, b, scales, order, tasks, out, accumulate):
    for task in range(tasks.shape[0]):
        _task(x, a, b, scales, order, tasks, out, accumulate, task)


def supports(x, a, b, scales, indices, out=None) -> str | None:
    """``None`` if the numba LoRA kernel serves this call, else why not."""
    for name, t in (("x", x), ("a", a), ("b", b), ("out", out)):
        if isinstance(t, torch.Tensor):
            reason = cpu_fp32_reason(name, t)
            if reason is not None:
                return reason
    for name, t in (("scales", scales), ("indices", indices)):
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return f"{name} is on {t.device}, numba kernels run on cpu"
    return None


def lora_bgmv(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mixed-batch LoRA delta, float32 on CPU (see :func:`reference.lora_bgmv`).

    Args:
        x: ``(rows, in_features)`` float32, any strides (copied if not contiguous).
        a: ``(n_adapters, rank, in_features)``, PEFT ``lora_A`` weights stacked.
        b: ``(n_adapters, out_features, rank)``, PEFT ``lora_B`` weights stacked.
        scales: ``(n_adapters,)``, ``alpha / rank`` per adapter.
        indices: ``(rows,)`` int64/int32 in ``[-1, n_adapters)``; -1 = no adapter. Out of
            range raises ``ValueError`` (the values are read on the host for the grouping).
        out: optional ``(rows, out_features)`` float32: the delta is added into it in place.

    Returns:
        The ``(rows, out_features)`` delta, or ``out`` with the delta added.

    Example:
        >>> a, b = torch.randn(2, 4, 8), torch.randn(2, 5, 4)
        >>> lora_bgmv(torch.randn(3, 8), a, b, torch.ones(2), torch.tensor([1, -1, 0])).shape
        torch.Size([3, 5])
    """
    reference.check_lora_args(x, a, b, scales, indices, out)
    reason = supports(x, a, b, scales, indices, out)
    if reason is not None:
        raise registry.BackendError(f"numba lora_bgmv cannot serve this call: {reason}")
    rows, n_out = x.shape[0], b.shape[1]
    accumulate = out is not None and out.is_contiguous()
    dst = out if accumulate else torch.empty((rows, n_out), dtype=torch.float32)
    if rows == 0 or n_out == 0:
        return dst if out is None else out
    order, tasks = _plan(as_array(indices.to(torch.int64)), a.shape[0], ROWS_PER_TASK)
    args = (
        as_array(x.contiguous()),
        as_array(a.contiguous()),
        as_array(b.contiguous()),
        as_array(scales.to(torch.float32).contiguous()),
        order,
        tasks,
        as_array(dst),
        accumulate,
    )
    threads = set_threads()
    work = rows * a.shape[1] * (x.shape[1] + n_out)
    if threads == 1 or tasks.shape[0] < 2 or work < SERIAL_BELOW:
        _bgmv_serial(*args)
    else:
        _bgmv_parallel(*args)
    if out is not None and not accumulate:
        return out.add_(dst)
    return dst


registry.register("lora_bgmv", "numba", ("cpu",), lora_bgmv, supports=supports, available=available)
