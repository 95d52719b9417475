"""Numba CPU attention: one pass over the keys with an online softmax (FlashAttention order).

A parallel pre-pass packs K (as GEMM_NR-column panels of K^T: 16 with AVX2, 32 with AVX-512)
and V (GEMM_NR-column panels) once per call. Each task then owns ``BQ`` query rows of one
(batch, head), read in place in MR=6-row panels, and walks the visible keys in ``BK``
blocks: scores ``S = Q K^T`` and ``O += P V`` both run on the ``_common`` register-tile
micro-kernel, with the scale, the mask and the running max/sum rescale in between. Only
a ``BQ x BK`` score tile exists per task, so memory stays O(BQ*BK) per thread at any length
(plus the packed K/V copy). Causal blocks past the diagonal are skipped, not masked: half the
FLOPs.

One core, (1, 1, 2048, 64) non-causal: 48 ms with 3x3 dot tiles for both products, 31 ms
with the register tile for both, 32 ms with K/V packed once instead of per query block
(but 0.5 ms less at (16, 4, 128, 64), where the per-block packing repeated for every head).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from ryzen_opt.kernels import reference, registry
from ryzen_opt.kernels.numba._common import (
    GEMM_NR,
    JIT,
    MR,
    _exp,
    _fma_rows_gemm_tile,
    _fma_rows_strided_tile,
    as_array,
    available,
    cpu_fp32_reason,
    scratch,
    set_threads,
)

# BQ=48: 8 MR panels per task; (16, 4, 128, 64) gives 192 tasks, 2 threads balanced;
# BQ=96/120 measured within noise at (1, 1, 2048, 64).
BQ = 48
# BK=128 (a multiple of GEMM_NR at 16 and 32 lanes): the 24 KiB score tile stays in L1.
# With the two-pass softmax and the 32-wide tile (2 threads, 1x8x4096x64 causal, 3 runs
# interleaved): 111.8-114.0 ms at 128, 108-116 at 96, 109-113 at 64, 120-123 at 192, 128-133
# at 384, chosen earlier with the dot-tile kernels and a one-pass softmax (one core at
# (1, 1, 2048, 64): 55 ms against 66 at 192); 16x4x128x64 the same at every size.
BK = 128
_NEG_INF = np.float32(-np.inf)


@njit(**JIT)
def _visible(nk, i, j0, causal, off):
    """Keys of a block (starting at key ``j0``, ``nk`` long) that query ``i`` sees: all, or
    under bottom-right aligned causality (query i sees keys j <= i + off) the first ones."""
    if not causal:
        return nk
    return min(nk, max(0, i + off + 1 - j0))


@njit(**JIT)
def _softmax_update(s, o, m, lsum, nq, nk, d, mask, has_mask, i0, j0, causal, off, mx, scale):
    """Scale and mask the raw score tile, then the online-softmax rescale of o, m, lsum.

    Two passes over the rows (``mx``: a scratch of one float per row): every row's scaling,
    masking and block maximum first, then the exponentials, sums and rescales. With both
    loops of a row in one pass the maximum and the exponential ran at 2.2-2.4 ns a score on
    this AVX-512 Xeon; split, 1.0-1.5 ns (the same values: one loop alone vectorizes, the pair
    did not). Causally hidden keys are skipped, not set to -inf and exponentiated, and get
    probability 0. (Running each row in whole vectors up to its last visible key, with a
    select for the lanes past it, instead of a scalar remainder: 10-25% slower on the Zen 4
    VM; padding the hidden lanes with -inf first: the same time as this.)
    """
    for r in range(nq):
        vis = _visible(nk, i0 + r, j0, causal, off)
        row = s[r]
        best = _NEG_INF
        if has_mask:
            mrow = mask[i0 + r]
            for c in range(vis):
                x = row[c] * scale + mrow[j0 + c]
                row[c] = x
                best = max(best, x)
        else:
            for c in range(vis):
                x = row[c] * scale
                row[c] = x
                best = max(best, x)
        mx[r] = best
    for r in range(nq):
        vis = _visible(nk, i0 + r, j0, causal, off)
        m_new = max(m[r], mx[r])
        row = s[r]
        if m_new == _NEG_INF:
            vis = 0  # nothing visible yet on this row: it contributes nothing to o
        else:
            alpha = _exp(m[r] - m_new)
            total = np.float32(0.0)
            for c in range(vis):
                p = _exp(row[c] - m_new)
                row[c] = p
                total += p
            lsum[r] = lsum[r] * alpha + total
            m[r] = m_new
            if alpha != 1.0:
                for c in range(d):
                    o[r, c] *= alpha
        for c in range(vis, nk):  # causally hidden keys: probability 0 for P V
            row[c] = 0.0


@njit(**JIT)
def _pack_kv_job(k, v, kp, vp, pack_v, t):
    """Job t packs keys [c*GEMM_NR, (c+1)*GEMM_NR) of one (batch, kv head): kp[.., c, dd, j]
    = K^T and, with ``pack_v``, vp[.., e, key, j] = V in GEMM_NR-column panels; zero past the
    last key and past head_dim."""
    hkv, lk, d = k.shape[1], k.shape[2], k.shape[3]
    n_c = kp.shape[2]
    b = t // (hkv * n_c)
    h = (t // n_c) % hkv
    c = t % n_c
    kpc = kp[b, h, c]
    vph = vp[b, h]
    for j in range(GEMM_NR):
        key = c * GEMM_NR + j
        if key < lk:
            kr = k[b, h, key]
            vr = v[b, h, key]
            for dd in range(d):
                kpc[dd, j] = kr[dd]
            if pack_v:
                for e in range(vph.shape[0]):
                    for u in range(GEMM_NR):
                        vph[e, key, u] = vr[e * GEMM_NR + u] if e * GEMM_NR + u < d else 0.0
        else:
            for dd in range(d):
                kpc[dd, j] = 0.0
            if pack_v:
                for e in range(vph.shape[0]):
                    for u in range(GEMM_NR):
                        vph[e, key, u] = 0.0


@njit(**JIT)
def _panel_keys(nk, nq, p, i0, j0, causal, off):
    """Keys of the block that any row of MR-row panel ``p`` sees (its last row sees most)."""
    return _visible(nk, i0 + min(nq, (p + 1) * MR) - 1, j0, causal, off)


@njit(**JIT)
def _tile_scores(qf, q0, qtail, kp, s, nq, nk, d, acc, i0, j0, causal, off):
    """s[:nq, :nk] = Q K^T (unscaled) with the register-tile micro-kernel, Q's rows read in
    place: row r of the block at ``qf[q0 + r*d:]`` (the flat, contiguous q), except a last
    panel of fewer than MR rows, read from ``qtail`` (its rows copied there, zero below) so
    that no row past the tensor is read. Packing Q into MR panels instead (scaled) took 0.32
    of 3.05 ms at (16, 4, 128, 64) causal on one core. Under causality each MR-row panel
    stops at the last GEMM_NR-column panel its rows can see; the columns past a row's
    visible keys are left as they are (the softmax never reads them and zeroes them)."""
    for p in range((nq + MR - 1) // MR):
        ni = min(MR, nq - p * MR)
        nvis = _panel_keys(nk, nq, p, i0, j0, causal, off)
        for c in range((nvis + GEMM_NR - 1) // GEMM_NR):
            if ni == MR:
                _fma_rows_gemm_tile(qf, q0 + p * MR * d, d, kp[c], d, acc)
            else:
                _fma_rows_gemm_tile(qtail, 0, d, kp[c], d, acc)
            nj = min(GEMM_NR, nk - c * GEMM_NR)
            for i in range(ni):
                row = s[p * MR + i, c * GEMM_NR : c * GEMM_NR + nj]
                for j in range(nj):
                    row[j] = acc[i * GEMM_NR + j]


@njit(**JIT)
def _tile_pv(s, vp, vf, v0, o, nq, nk, d, acc, i0, j0, causal, off):
    """o[:nq] += P V, P's rows read in place from the score tile (C-contiguous; its rows from
    nq to the end of the last MR panel must be zero). Packing P into MR panels first cost a
    strided copy of every probability: the P V part of a 16x4x128x64 causal call took 0.75
    ms on one core with it, 0.62 ms without (one-off timings on the loaded 2-core Xeon).
    Under causality each panel sums only the keys its rows can see (the rest have P = 0).

    V: with ``vp`` of one panel or more, its packed GEMM_NR-column panels (key-major from
    key j0); with ``vp`` empty (head_dim a multiple of GEMM_NR), V's own rows in place: key
    j0's row at ``vf[v0:]``, row stride d."""
    flat = s.reshape(-1)
    ld = s.shape[1]
    in_place = vp.shape[0] == 0
    for p in range((nq + MR - 1) // MR):
        ni = min(MR, nq - p * MR)
        nvis = _panel_keys(nk, nq, p, i0, j0, causal, off)
        if nvis == 0:
            continue
        for e in range((d + GEMM_NR - 1) // GEMM_NR):
            if in_place:
                _fma_rows_strided_tile(flat, p * MR * ld, ld, vf, v0 + e * GEMM_NR, d, nvis, acc)
            else:
                _fma_rows_gemm_tile(flat, p * MR * ld, ld, vp[e], nvis, acc)
            nj = min(GEMM_NR, d - e * GEMM_NR)
            for i in range(ni):
                row = o[p * MR + i, e * GEMM_NR : e * GEMM_NR + nj]
                for j in range(nj):
                    row[j] += acc[i * GEMM_NR + j]


@njit(**JIT)
def _task_buffers(bq, bk, d):
    """One worker's scratch for :func:`_attention_task` (every task re-initialises what it
    reads): the score tile, the micro-kernel accumulator, the Q tail panel, the output block,
    and the running max, sum and block max of each row."""
    npq = (bq + MR - 1) // MR
    return (
        np.empty((npq * MR, bk), dtype=np.float32),
        np.empty(MR * GEMM_NR, dtype=np.float32),
        np.empty(MR * d, dtype=np.float32),
        np.empty((bq, d), dtype=np.float32),
        np.empty(bq, dtype=np.float32),
        np.empty(bq, dtype=np.float32),
        np.empty(bq, dtype=np.float32),
    )


@njit(**JIT)
def _attention_task(q, v, kp, vp, lk, out, mask, has_mask, causal, scale, bq, bk, t, bufs):
    """q (B, Hq, Lq, D); v (B, Hkv, Lk, D) contiguous; kp, vp: packed K^T / V panels (see
    _pack_kv_job; vp with an empty panel axis when V is read in place); mask any strides;
    ``bufs`` from :func:`_task_buffers` (allocated once per worker, not per task)."""
    nb, hq, lq, d = q.shape
    hkv = kp.shape[1]
    group = hq // hkv
    off = lk - lq
    n_qb = (lq + bq - 1) // bq
    b = t // (hq * n_qb)
    h = (t // n_qb) % hq
    i0 = (t % n_qb) * bq
    nq = min(bq, lq - i0)
    kv = h // group
    qm, om = q[b, h], out[b, h]
    mk = mask[b, h]
    kend = min(lk, i0 + nq + off) if causal else lk
    s, acc, qtail, o, m, lsum, mx = bufs
    s[nq:] = 0.0  # the last panel's rows past nq: read by the P V tile, never written
    qf = q.reshape(-1)
    vf = v.reshape(-1)
    q0 = ((b * hq + h) * lq + i0) * d
    tail = nq % MR
    qtail[:] = 0.0
    for r in range(tail):
        qtail[r * d : (r + 1) * d] = qm[i0 + nq - tail + r]
    o[:] = 0.0
    m[:] = _NEG_INF
    lsum[:] = 0.0
    # K and V were packed once per call (a parallel pre-pass); packing them per query block
    # instead cost 5.6 of 30 ms at (1, 1, 2048, 64) on one core.
    for j0 in range(0, max(kend, 0), bk):
        nk = min(bk, kend - j0)
        _tile_scores(
            qf, q0, qtail, kp[b, kv, j0 // GEMM_NR :], s, nq, nk, d, acc, i0, j0, causal, off
        )
        _softmax_update(s, o, m, lsum, nq, nk, d, mk, has_mask, i0, j0, causal, off, mx, scale)
        v0 = ((b * hkv + kv) * lk + j0) * d
        _tile_pv(s, vp[b, kv, :, j0:], vf, v0, o, nq, nk, d, acc, i0, j0, causal, off)
    for r in range(nq):
        inv = np.float32(1.0) / lsum[r] if lsum[r] > 0 else np.float32(0.0)
        for c in range(d):
            om[i0 + r, c] = o[r, c] * inv


@njit(parallel=True, **JIT)
def _attention_parallel(
    q, k, v, kp, vp, out, mask, has_mask, causal, scale, bq, bk, tasks, workers
):
    """The tasks in ``workers`` contiguous ranges, one per thread, each with its own scratch
    (the split numba's prange makes of ``range(tasks)`` too; per-task allocations cost 2-3%
    at (16, 4, 128, 64), see NOTES.md)."""
    pack_v = vp.shape[2] > 0
    for t in prange(kp.shape[0] * kp.shape[1] * kp.shape[2]):
        _pack_kv_job(k, v, kp, vp, pack_v, t)
    for w in prange(workers):
        bufs = _task_buffers(bq, bk, q.shape[3])
        for t in range(w * tasks // workers, (w + 1) * tasks // workers):
            _attention_task(
                q, v, kp, vp, k.shape[2], out, mask, has_mask, causal, scale, bq, bk, t, bufs
            )


@njit(**JIT)
def _attention_serial(q, k, v, kp, vp, out, mask, has_mask, causal, scale, bq, bk, tasks, workers):
    pack_v = vp.shape[2] > 0
    for t in range(kp.shape[0] * kp.shape[1] * kp.shape[2]):
        _pack_kv_job(k, v, kp, vp, pack_v, t)
    bufs = _task_buffers(bq, bk, q.shape[3])
    for t in range(tasks):
        _attention_task(
            q, v, kp, vp, k.shape[2], out, mask, has_mask, causal, scale, bq, bk, t, bufs
        )


def supports(q, k, v, causal=False, scale=None, attn_mask=None):
    """``None`` if the numba attention serves this call, else why not."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor):
            reason = cpu_fp32_reason(name, t)
            if reason is not None:
                return reason
    if isinstance(attn_mask, torch.Tensor) and attn_mask.device.type != "cpu":
        return f"attn_mask is on {attn_mask.device}, numba kernels run on cpu"
    return None


def _additive_mask(attn_mask, shape):
    """The mask as float32 to add to scores, broadcast to ``shape`` as a stride-0 view."""
    if attn_mask is None:
        return torch.zeros((1, 1, 1, 1), dtype=torch.float32).expand(shape)
    if attn_mask.dtype == torch.bool:
        add = torch.zeros(attn_mask.shape, dtype=torch.float32).masked_fill_(~attn_mask, -math.inf)
    else:
        add = attn_mask.to(torch.float32)
    while add.dim() < 4:
        add = add.unsqueeze(0)
    return add.expand(shape)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention on CPU in float32 (see :func:`reference.attention`).

    Args:
        q: ``(B, Hq, Lq, D)`` float32.
        k, v: ``(B, Hkv, Lk, D)`` with ``Hkv`` dividing ``Hq`` (grouped-query).
        causal: bottom-right aligned causal masking.
        scale: softmax scale (default ``1/sqrt(D)``).
        attn_mask: optional boolean (``True`` = keep) or additive float mask broadcastable to
            ``(B, Hq, Lq, Lk)``; it is read through a broadcast view, never expanded.

    Returns:
        ``(B, Hq, Lq, D)``; a row that sees no key is zero.

    Example:
        >>> o = attention(torch.randn(1, 2, 5, 8), torch.randn(1, 1, 7, 8),
        ...               torch.randn(1, 1, 7, 8), causal=True)
    """
    reference.check_attention_args(q, k, v, attn_mask, scale)
    reason = supports(q, k, v, causal, scale, attn_mask)
    if reason is not None:
        raise registry.BackendError(f"numba attention cannot serve this call: {reason}")
    threads = set_threads()
    b, hq, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty((b, hq, lq, d), dtype=torch.float32)
    if out.numel() == 0:
        return out
    if lk == 0:
        return out.zero_()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mask = _additive_mask(attn_mask, (b, hq, lq, lk))
    tasks = b * hq * -(-lq // BQ)
    # Serial below ~2**18 FMAs: an OpenMP wake-up costs more than the work (see matmul).
    small = b * hq * lq * lk * d < (1 << 18)
    run = _attention_serial if threads == 1 or small else _attention_parallel
    n_c = -(-lk // GEMM_NR)
    kp = scratch("attention_k", (b, k.shape[1], n_c, d, GEMM_NR))
    # V's rows are read in place when they hold whole GEMM_NR-column panels; else packed.
    # The pre-pass cost 0.32 ms of a 2.9 ms call at (16, 4, 128, 64) on one core, V half.
    v_panels = 0 if d % GEMM_NR == 0 else -(-d // GEMM_NR)
    vp = scratch("attention_v", (b, k.shape[1], v_panels, n_c * GEMM_NR, GEMM_NR))
    run(
        as_array(q.contiguous()),
        as_array(k.contiguous()),
        as_array(v.contiguous()),
        kp,
        vp,
        as_array(out),
        as_array(mask),
        attn_mask is not None,
        bool(causal),
        np.float32(scale),
        BQ,
        BK,
        tasks,
        min(threads, tasks),
    )
    return out


registry.register("attention", "numba", ("cpu",), attention, supports=supports, available=available)
