"""Numba CPU mixed-batch LoRA (BGMV): row ``r`` adds ``scales[i] * B[i] @ (A[i] @ x[r])``.

Rows are grouped by adapter first (a counting sort of ``indices``, O(rows)); each task is
one adapter and up to ``ROWS_PER_TASK`` of its rows, so A[i] and B[i] are read once per task
rather than once per row:

* shrink ``t = scale * x A^T`` (rank wide): a 3x3 block of dot products (three rows against
  three A rows over ``in_features``, ``_common._dot3x3``), 1x4 blocks for the rows left over;
* expand ``y = t B^T``: the dot runs over ``rank`` (16 floats), so short that its horizontal
  sum costs as much as its multiply-adds. Groups of ``TILE_ROWS`` or more go through the
  packed-GEMM register tile (``_common._fma_rows_tile``: six B rows read in place against
  ``t^T`` packed as one panel); smaller groups (the decode rows of a mixed batch) through
  :func:`_dot8`, eight dots with one shared transposing reduction.

PEFT's layouts are used as they are: no weight is transposed or copied per call. Tasks run in
a ``prange`` when there are at least two and enough work; otherwise serially (waking the
OpenMP pool costs more than a small call: see ``numba/NOTES.md``).

Measured (shared 2-core AVX-512 VM under load, one thread for torch and numba, fp32, rank 16,
in = out = 2048, ``ryzen_opt.timing.time_interleaved``, 21 values, medians): 16 rows over 4
adapters 65.7-70.6 us vs the same rows on one adapter 56-56.8 us (1.17-1.27x over three
runs; the reference: 207-213 us vs 91-112 us); one row 18.5 us, about 2% of the 2048 x 2048
``F.linear`` it adapts (712-875 us here, bandwidth-bound); the reference's row 48-52 us.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ryzen_opt.kernels import reference, registry
from ryzen_opt.kernels.numba._common import (
    JIT,
    MR,
    NR,
    _as_i64,
    _dot1x4,
    _dot3x3,
    _f32_arrays,
    _fma_rows_tile,
    available,
    cpu_fp32_reason,
    set_threads,
)


@intrinsic
def _dot8(typingctx, b, b0, ldb, t, t0, kv, y):
    """y[j] = sum over k < kv of b[b0 + j*ldb + k] * t[t0 + k], for j < 8 (kv a multiple of 8).

    Eight short dot products (rank-long rows of B against one t row) with one transposing
    reduction: eight <8 x float> accumulators are summed lane-wise in a shuffle tree (7
    adds, 15 shuffles for 8 outputs) instead of eight horizontal sums, which is what bounds
    a dot over 16 floats. Written in IR like ``_common._fma_tile``: numba's loop vectorizer
    reduces each dot separately. Measured (rank 16, 2048 outputs, 4 rows, one core): 7.1 us
    against 12.3 us for the 1x4 dot blocks.
    """
    if not (_f32_arrays(b, t, y) and all(isinstance(v, types.Integer) for v in (b0, ldb, t0, kv))):
        return None

    def codegen(context, builder, sig, args):
        f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
        vec = ir.VectorType(f32, 8)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v8f32"
        )
        b_ptr = context.make_array(sig.args[0])(context, builder, args[0]).data
        t_ptr = context.make_array(sig.args[3])(context, builder, args[3]).data
        y_ptr = context.make_array(sig.args[6])(context, builder, args[6]).data
        start, stride = _as_i64(builder, args[1]), _as_i64(builder, args[2])
        tstart, n = _as_i64(builder, args[4]), _as_i64(builder, args[5])
        rows = [builder.add(start, builder.mul(stride, ir.Constant(i64, j))) for j in range(8)]
        zero = ir.Constant(vec, None)
        entry = builder.block
        loop = builder.append_basic_block("dot8_loop")
        done = builder.append_basic_block("dot8_done")
        builder.cbranch(builder.icmp_signed(">", n, ir.Constant(i64, 0)), loop, done)
        builder.position_at_end(loop)
        k = builder.phi(i64)
        k.add_incoming(ir.Constant(i64, 0), entry)
        accs = []
        for _ in range(8):
            p = builder.phi(vec)
            p.add_incoming(zero, entry)
            accs.append(p)
        ld = lambda ptr, idx: builder.load(
            builder.bitcast(builder.gep(ptr, [idx]), vec.as_pointer()), align=4
        )
        tv = ld(t_ptr, builder.add(tstart, k))
        new = [
            builder.call(fma, [ld(b_ptr, builder.add(rows[j], k)), tv, accs[j]]) for j in range(8)
        ]
        k1 = builder.add(k, ir.Constant(i64, 8))
        tail = builder.block
        k.add_incoming(k1, tail)
        for p, v in zip(accs, new, strict=True):
            p.add_incoming(v, tail)
        builder.cbranch(builder.icmp_signed("<", k1, n), loop, done)
        builder.position_at_end(done)
        outs = []
        for j in range(8):
            r = builder.phi(vec)
            r.add_incoming(zero, entry)
            r.add_incoming(new[j], tail)
            outs.append(r)
        mask = lambda idx: ir.Constant(ir.VectorType(i32, 8), idx)
        shuf = lambda a, b, idx: builder.shuffle_vector(a, b, mask(idx))
        half = lambda a, b, lo, hi: builder.fadd(shuf(a, b, lo), shuf(a, b, hi))
        s = [
            half(
                outs[2 * i],
                outs[2 * i + 1],
                [0, 1, 2, 3, 8, 9, 10, 11],
                [4, 5, 6, 7, 12, 13, 14, 15],
            )
            for i in range(4)
        ]
        u = half(s[0], s[1], [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])
        v = half(s[2], s[3], [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])
        w = half(u, v, [0, 8, 2, 10, 4, 12, 6, 14], [1, 9, 3, 11, 5, 13, 7, 15])
        res = shuf(w, w, [0, 4, 2, 6, 1, 5, 3, 7])
        builder.store(res, builder.bitcast(y_ptr, vec.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(b, b0, ldb, t, t0, kv, y), codegen


# Rows of one adapter per task: the register tile's width (NR = 16 token rows). Grouping vs
# one row per task (A and B re-read for every row), 2048 x 2048, rank 16, one thread, two
# runs each: 16 rows on one adapter 54-57 us vs 94-99 us; 16 rows over 4 adapters 66-68 us
# vs 72-73 us; 64 rows over 4 adapters 197-207 us vs 242 us.
ROWS_PER_TASK = NR
# Groups of at least this many rows expand through the MR x NR register tile, smaller ones
# through _dot8 (eight outputs of one row a step). The tile computes all NR = 16 columns
# whatever the group's size. Measured (one adapter, 2048 x 2048, rank 16, one thread, whole
# call, best of two runs on the loaded 2-core box): 8 rows 36.3 us by _dot8 vs 40.9 us by
# the tile, 12 rows 47.0 vs 47.7, 16 rows 56.3 vs 53.1.
TILE_ROWS = 12
# Serial below this many multiply-adds (rows * rank * (in + out)): 4M is ~250 us of serial
# work, where halving it repays a pool wake-up. Decode batches stay below (16 rows at 2048 x
# 2048, rank 16, are 1M: 68 us serial). Measured on the shared 2-core box under load (load
# average 5): that call took 13 ms through the prange driver, its workers descheduled.
SERIAL_BELOW = 1 << 22


@njit(**JIT)
def _plan(idx, n_adapters, rows_per_task):
    """Rows grouped by adapter and the task list.

    Returns ``order`` (row numbers, adapter by adapter, rows without an adapter last),
    ``tasks`` of ``(adapter, lo, hi)`` (rows ``order[lo:hi]`` use ``adapter``, -1: none) and
    the first row whose index lies outside ``[-1, n_adapters)`` (-1 if none; then the
    arrays are empty and nothing may run).
    """
    rows = idx.shape[0]
    for r in range(rows):
        if idx[r] < -1 or idx[r] >= n_adapters:
            return np.empty(0, dtype=np.int64), np.empty((0, 3), dtype=np.int64), r
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
    return order, tasks, -1


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
    kl = rank - 1
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
    # Expand: y[row_u, n] = t[u] . B[n] over rank, eight outputs a step.
    tf = t.reshape(-1)
    bf = bw.reshape(-1)
    k8 = rank // 8 * 8
    n8 = n_out // 8 * 8
    y8 = np.empty(8, dtype=np.float32)
    for u in range(g):
        r = order[lo + u]
        tr = t[u]
        for n in range(0, n8, 8):
            _dot8(bf, n * rank, rank, tf, u * rank, k8, y8)
            for w in range(8):
                v = y8[w]
                for k in range(k8, rank):
                    v += bw[n + w, k] * tr[k]
                _put(out, r, n + w, v, accumulate)
        for n in range(n8, n_out):
            v = np.float32(0.0)
            for k in range(rank):
                v += bw[n, k] * tr[k]
            _put(out, r, n, v, accumulate)


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
def _bgmv_parallel(x, a, b, scales, idx, out, accumulate):
    order, tasks, bad = _plan(idx, a.shape[0], ROWS_PER_TASK)
    if tasks.shape[0] < 2:  # one group (all rows on one adapter): no pool wake-up
        for task in range(tasks.shape[0]):
            _task(x, a, b, scales, order, tasks, out, accumulate, task)
        return bad
    for task in prange(tasks.shape[0]):
        _task(x, a, b, scales, order, tasks, out, accumulate, task)
    return bad


@njit(**JIT)
def _bgmv_serial(x, a, b, scales, idx, out, accumulate):
    # The plan runs inside the one compiled call: each numba call from Python costs ~1.5-2.5
    # us of argument unboxing, a quarter of a 256-wide decode row's whole budget.
    order, tasks, bad = _plan(idx, a.shape[0], ROWS_PER_TASK)
    for task in range(tasks.shape[0]):
        _task(x, a, b, scales, order, tasks, out, accumulate, task)
    return bad


def _np(t: torch.Tensor) -> np.ndarray:
    # as_array's detach() costs ~0.5 us a tensor; inference inputs rarely need it.
    return t.detach().numpy() if t.requires_grad else t.numpy()


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
    # The range of indices is checked by the compiled plan (it reads them anyway), not by a
    # second pass here.
    reference.check_lora_args(x, a, b, scales, indices, out, check_range=False)
    reason = supports(x, a, b, scales, indices, out)
    if reason is not None:
        raise registry.BackendError(f"numba lora_bgmv cannot serve this call: {reason}")
    rows, n_out = x.shape[0], b.shape[1]
    accumulate = out is not None and out.is_contiguous()
    dst = out if accumulate else torch.empty((rows, n_out), dtype=torch.float32)
    if rows == 0 or n_out == 0:
        return dst if out is None else out
    idx = indices if indices.dtype == torch.int64 else indices.to(torch.int64)
    args = (
        _np(x.contiguous()),
        _np(a.contiguous()),
        _np(b.contiguous()),
        _np(scales if scales.dtype == torch.float32 else scales.float()),
        _np(idx.contiguous()),
        _np(dst),
        accumulate,
    )
    threads = set_threads()
    work = rows * a.shape[1] * (x.shape[1] + n_out)
    serial = threads == 1 or work < SERIAL_BELOW or rows < 2
    bad = (_bgmv_serial if serial else _bgmv_parallel)(*args)
    if bad >= 0:
        raise ValueError(
            f"indices must lie in [-1, {a.shape[0] - 1}] (-1 = no adapter; a holds "
            f"{a.shape[0]} adapters), got {int(indices[bad])} at row {bad}"
        )
    if out is not None and not accumulate:
        return out.add_(dst)
    return dst


registry.register("lora_bgmv", "numba", ("cpu",), lora_bgmv, supports=supports, available=available)
