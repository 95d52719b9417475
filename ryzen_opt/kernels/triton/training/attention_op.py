"""Triton flash attention for training: the forward also stores the log-sum-exp of each
query row, and the backward recomputes the probabilities tile by tile from it.

``softmax(q k^T * scale) v`` in SDPA layout with grouped query heads and bottom-right
aligned causal masking (see :func:`ryzen_opt.kernels.reference.attention`); query rows that
see no key output zeros and receive zero gradient. The forward reuses the inference
kernel's tile loop (:mod:`ryzen_opt.kernels.triton.attention`). Backward:

* one program per (query tile, query head) computes ``delta = rowsum(dO * O)``;
* one program per (key tile, KV head, share of the group's query heads) keeps its ``dK``,
  ``dV`` tiles in registers and walks every query tile of its query heads (no atomics). With
  grouped heads and few key tiles, one program per KV head leaves most of the GPU idle (2 x 4
  KV heads x 32 tiles of 64 keys = 256 programs on 132 SMs, each walking 8 query heads, the
  causal first tiles the longest): the group is then split into shares (:func:`_dkdv_split`)
  whose fp32 partial ``dK``, ``dV`` are summed in share order afterwards;
* one program per (query tile, query head) accumulates ``dQ`` over the key tiles it sees.

None materialises the ``(Lq, Lk)`` probabilities: memory is ``O(L)`` beyond the inputs,
where eager attention's backward keeps the full probability matrix from the forward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ryzen_opt.kernels import reference
from ryzen_opt.kernels.triton import _common as _tcommon
from ryzen_opt.kernels.triton._launcher import CachedLauncher
from ryzen_opt.kernels.triton.attention import _attn_tiles
from ryzen_opt.kernels.triton.training import _common

# fmt: off
# Kernel signatures and launches keep their arguments grouped by role (pointers, sizes,
# strides, meta-parameters) on shared lines, as STYLE.md asks.

_MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
# None: the backward's tiles of _bwd_blocks; a pair of (BLOCK_M, BLOCK_N, warps, stages), the
# dK/dV kernel's and the dQ kernel's, replaces them on the GPU (A/B timings:
# ``python -m bench.triton_ab attention-bwd``).
_BWD_TILES: tuple[tuple[int, int, int, int], tuple[int, int, int, int]] | None = None


def _blocks(d: int, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). The interpreter takes 16 (and 32 for the
    backward's long side, so that its two tile shapes differ there as on the GPU): small test
    shapes cross several tiles. On the GPU the forward takes the inference kernel's tiles.
    The backward's were measured on an H200 (Triton 3.6, bf16, causal, 1024 tokens, 4 KV
    heads; ``python -m bench.train_attention_tiles``, GPU kernel time from the profiler:
    ``bench/results/h200/train_attention_tiles.txt``): 64 x 64 with two stages is the fastest
    at head dims 64 (173 us; 32 x 32 246 us) and 128 (142 us; 32 x 32 191 us). At head dim
    128 the 32 x 64 two-stage tile computed dK 1.6e-2 away from float64 (dQ, dV and SDPA's
    own dK 2.4e-3 to 3e-3; 16 x 64 0.8e-2), which no ordering of the same bf16 products
    explains: it is not used (``bench/results/h200/train_attention_bwd_tiles.txt``, whose
    wall-clock times measured the host's launch jitter, not the tiles). Three stages at head
    dim 64 (``python -m bench.triton_ab attention-bwd``, forward + backward over graph replays,
    two runs, ``bench/results/h200/attention_bwd-run1/-run2.log``): 1.09x two stages without
    a mask (1 x 32 / 4 heads x 4096: 1.313 / 1.324 ms against 1.431 / 1.441), the same with
    one (2 x 32 / 4 x 2048: 0.500 / 0.505 against 0.502 / 0.505); at head dim 128 it lost
    19-29% (1.774 / 1.809 against 1.495 / 1.515 ms at 4096 causal)."""
    if _tcommon.INTERPRET:
        return (16, 32, 4, 1) if backward else (16, 16, 4, 1)
    if backward:
        return (64, 64, 4, 3 if d <= 64 else 2)
    return (128, 64, 8, 3) if d <= 64 else (64, 64, 4, 2)


def _bwd_blocks(d: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the dK/dV kernel (``BLOCK_M`` query rows a step
    against ``BLOCK_N`` keys held) and of the dQ kernel (``BLOCK_M`` query rows held): the
    two sides of :func:`_blocks`' backward tile, unless ``_BWD_TILES`` names others."""
    if _BWD_TILES is not None and not _tcommon.INTERPRET:
        return _BWD_TILES
    small, big, warps, stages = _blocks(d, backward=True)
    return (small, big, warps, stages), (big, small, warps, stages)


@triton.jit
def _fwd_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    # sizes
    H, GROUPS, Lq, Lk, HEAD_DIM, qk_scale,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om,
    # meta-parameters
    CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FOLD_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUPS).to(tl.int64)
    h = h.to(tl.int64)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    diag = Lk - Lq
    if CAUSAL:
        hi = min(Lk, max(start_m + BLOCK_M + diag, 0))
        n_full = min(Lk // BLOCK_N, max(start_m + diag + 1, 0) // BLOCK_N)
    else:
        hi = Lk
        n_full = Lk // BLOCK_N
    full_end = n_full * BLOCK_N
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, full_end, Lk, diag, qk_scale, HEAD_DIM,
        False, CAUSAL, EVEN_D, INPUT_PRECISION, UPCAST, BLOCK_N, FOLD_SCALE,
    )
    acc, l_i, m_i = _attn_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, full_end, hi, Lk, diag, qk_scale, HEAD_DIM,
        True, CAUSAL, EVEN_D, INPUT_PRECISION, UPCAST, BLOCK_N, FOLD_SCALE,
    )
    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
             + offs_d[None, :], acc.to(o_ptr.dtype.element_ty), mask=io_mask)
    # log2-domain log-sum-exp (-inf for a row that sees no key; backward's mask zeroes it).
    lse = m_i + tl.math.log2(l_i)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


_launch_fwd = CachedLauncher(_fwd_kernel, loose="ints")


@triton.jit
def _delta_kernel(
    # pointers
    o_ptr, do_ptr, delta_ptr,
    # sizes
    H, Lq, HEAD_DIM,
    # strides (o is contiguous)
    stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm, stride_dd,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm
                 + offs_d[None, :] * stride_dd, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


_launch_delta = CachedLauncher(_delta_kernel, loose="ints")


@triton.jit
def _load_rows(ptrs, rows, L, d_mask, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, D) tile. ``MASKED``: rows at or past ``L`` and columns past the head dim read
    as 0; otherwise the tile is in bounds (only the columns masked when not ``EVEN_D``)."""
    if MASKED:
        x = tl.load(ptrs, mask=(rows[:, None] < L) & d_mask, other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_mask, other=0.0)
    return x


@triton.jit
def _probs(q, k, lse, offs_m, offs_n, Lq, Lk, diag, qk_scale, INPUT_PRECISION: tl.constexpr,
           CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """The probability tile exp2(q k^T * scale * log2e - lse); ``MASKED``: zero where a
    pair is out of bounds or masked (an unmasked tile has every pair in bounds and seen)."""
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        keep = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
        p = tl.where(keep, p, 0.0)
    return p


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v,
    q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_om, stride_od,
    offs_n, offs_d, lo, hi, Lq, Lk, diag, qk_scale, HEAD_DIM,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dK, dV of one key tile accumulated over the query tiles starting in [lo, hi) of one
    query head (``*_base``: that head's rows)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_rows(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       offs_m, Lq, d_mask, MASKED, EVEN_D)
        do = _load_rows(do_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                        offs_m, Lq, d_mask, MASKED, EVEN_D)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=offs_m < Lq, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < Lq, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        p = _probs(q, k, lse, offs_m, offs_n, Lq, Lk, diag, qk_scale, INPUT_PRECISION, CAUSAL,
                   MASKED)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    # sizes (SHARE: query heads per program; dk, dv hold one (B, HKV, Lk, D) slab per share)
    HQ, HKV, GROUPS, SHARE, Lq, Lk, HEAD_DIM, qk_scale, scale,
    # strides (dk, dv are contiguous like k)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    # meta-parameters
    CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    # axis 1 runs over (share, batch, KV head), share slowest: the program's output slab
    pid_sbh = tl.program_id(1)
    n_bh = tl.num_programs(1) // (GROUPS // SHARE)
    g0 = (pid_sbh // n_bh) * SHARE
    pid_bh = pid_sbh % n_bh
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    kv_mask = (offs_n[:, None] < Lk) & d_mask
    k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    diag = Lk - Lq
    # Causal: query row m sees key n when n <= m + diag; the first row that sees this tile.
    lo = max(start_n - diag, 0) // BLOCK_M * BLOCK_M if CAUSAL else 0
    # Query tiles [lo, a) and [e, Lq) cross the diagonal or an edge (masked); [a, e) see
    # the whole key tile and are in bounds (SPLIT; without it every tile is masked).
    # (lo <= a <= e; a partial key tile is masked throughout.)
    a = Lq
    e = Lq
    if SPLIT:
        e_split = max(Lq // BLOCK_M * BLOCK_M, lo)
        a_split = lo
        if CAUSAL:  # the first query tile whose first row sees the tile's last key
            a_split = max(a_split, (max(start_n + BLOCK_N - 1 - diag, 0) + BLOCK_M - 1)
                          // BLOCK_M * BLOCK_M)
        a_split = min(a_split, e_split)
        whole = start_n + BLOCK_N <= Lk
        a = tl.where(whole, a_split, Lq)
        e = tl.where(whole, e_split, Lq)
    for g in range(g0, g0 + SHARE):
        h = hk * GROUPS + g
        row0 = b * HQ + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_ob + h * stride_oh
        lse_base = lse_ptr + row0 * Lq
        delta_base = delta_ptr + row0 * Lq
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_om, stride_od,
            offs_n, offs_d, lo, a, Lq, Lk, diag, qk_scale, HEAD_DIM,
            True, CAUSAL, EVEN_D, INPUT_PRECISION, UPCAST, BLOCK_M,
        )
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_om, stride_od,
            offs_n, offs_d, a, e, Lq, Lk, diag, qk_scale, HEAD_DIM,
            False, CAUSAL, EVEN_D, INPUT_PRECISION, UPCAST, BLOCK_M,
        )
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qm, stride_qd, stride_om, stride_od,
            offs_n, offs_d, e, Lq, Lq, Lk, diag, qk_scale, HEAD_DIM,
            True, CAUSAL, EVEN_D, INPUT_PRECISION, UPCAST, BLOCK_M,
        )
    out = pid_sbh.to(tl.int64) * Lk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


_launch_bwd_dkdv = CachedLauncher(_bwd_dkdv_kernel, loose="ints")


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, lo, hi, Lq, Lk, diag, qk_scale, HEAD_DIM,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query tile accumulated over the key tiles starting in [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       offs_n, Lk, d_mask, MASKED, EVEN_D)
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       offs_n, Lk, d_mask, MASKED, EVEN_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = _probs(q, k, lse, offs_m, offs_n, Lq, Lk, diag, qk_scale, INPUT_PRECISION, CAUSAL,
                   MASKED)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    # sizes
    HQ, GROUPS, Lq, Lk, HEAD_DIM, qk_scale, scale,
    # strides (dq is contiguous like q)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    # meta-parameters
    CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    hk = (h // GROUPS).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    io_mask = (offs_m[:, None] < Lq) & d_mask
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)
    do = tl.load(do_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                 + offs_d[None, :] * stride_od, mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row0 = pid_bh.to(tl.int64)
    lse = tl.load(lse_ptr + row0 * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(delta_ptr + row0 * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    diag = Lk - Lq
    hi = min(Lk, max(start_m + BLOCK_M + diag, 0)) if CAUSAL else Lk
    # Key tiles [0, nf) are seen whole by every row of this (in-bounds) query tile: no masks
    # (SPLIT; without it, or for the last partial query tile, every tile is masked).
    nf = 0
    if SPLIT:
        seen = min(Lk, max(start_m + diag + 1, 0)) if CAUSAL else Lk
        nf = tl.where(start_m + BLOCK_M <= Lq, seen // BLOCK_N * BLOCK_N, 0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _dq_tiles(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, nf, Lq, Lk, diag, qk_scale, HEAD_DIM,
        False, CAUSAL, EVEN_D, INPUT_PRECISION, UPCAST, BLOCK_N,
    )
    dq = _dq_tiles(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, nf, hi, Lq, Lk, diag, qk_scale, HEAD_DIM,
        True, CAUSAL, EVEN_D, INPUT_PRECISION, UPCAST, BLOCK_N,
    )
    out = row0 * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptr + out, (dq * scale).to(dq_ptr.dtype.element_ty), mask=io_mask)


_launch_bwd_dq = CachedLauncher(_bwd_dq_kernel, loose="ints")


def _meta(q):
    d = q.shape[-1]
    return {
        "BLOCK_D": max(16, _common.next_pow2(d)),
        "INPUT_PRECISION": _tcommon.dot_precision(q.dtype),
        "UPCAST": _tcommon.upcast_dot(q.dtype),
    }


def _forward(q, k, v, causal, scale):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    o = torch.empty((b, hq, lq, d), device=q.device, dtype=q.dtype)
    lse = torch.full((b, hq, lq), float("-inf"), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    if lk == 0:
        return o.zero_(), lse
    bm, bn, warps, stages = _blocks(d)
    meta = _meta(q)
    _launch_fwd(
        (_common.cdiv(lq, bm), b * hq),
        q, k, v, o, lse,
        hq, hq // hkv, lq, lk, d, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *o.stride()[:3],
        CAUSAL=causal, EVEN_D=meta["BLOCK_D"] == d, FOLD_SCALE=scale >= 0, **meta,
        BLOCK_M=bm, BLOCK_N=bn,
        num_warps=warps, num_stages=stages,
    )
    return o, lse


# None: chosen by _dkdv_split; an int forces the number of shares (tests, A/B timings).
_DKDV_SHARES: int | None = None
# The backward's tiles that see every key of theirs and lie in bounds run without masks
# (False: every tile masked, the kernels of old; tests and A/B timings).
_SPLIT_MASKS = True


def _dkdv_split(programs: int, groups: int, sms: int, causal: bool, rows: int) -> int:
    """Shares to split each KV head's query-head group into for the dK/dV kernel.

    ``programs`` is the dK/dV grid with one program per (key tile, KV head); ``rows`` the
    query rows such a program walks (``Lq * groups``). Causal masking leaves the first key
    tiles with the longest walks, so the longest program sets the time: the fewest shares (a
    divisor of ``groups``) that give four programs an SM, or walks of at most 4096 rows.
    Measured on an H200 (``python -m bench.triton_ab attention-bwd-split``, graph replay,
    ``bench/results/h200/attention_bwd_split.log``): 2 x 32 query / 4 KV heads x 2048
    tokens, head dim 64: 0.636 ms one share, 0.520 four; 32 / 8 heads x 4096 tokens, head dim
    128: 1.747 ms, 1.627 two; 4 x 32 / 8 heads x 1024 tokens: 0.540 ms one share, 0.558 two
    (walks of 4096 rows: not split). Without causal masking the programs are even and
    splitting measured 0.99-1.00x: one share. Each share beyond one costs an fp32
    (B, HKV, Lk, D) slab for dK and for dV and a sum over them.
    """
    if _DKDV_SHARES is not None:
        if groups % _DKDV_SHARES:
            raise ValueError(f"_DKDV_SHARES={_DKDV_SHARES} does not divide {groups} groups")
        return _DKDV_SHARES
    if not causal:
        return 1
    for shares in range(1, groups + 1):
        if groups % shares == 0 and (programs * shares >= 4 * sms or rows // shares <= 4096):
            return shares
    return groups


def _backward(do, q, k, v, o, lse, causal, scale):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if q.numel() == 0 or lk == 0:
        z = {"device": q.device, "dtype": q.dtype}
        return (torch.zeros(q.shape, **z), torch.zeros(k.shape, **z), torch.zeros(v.shape, **z))
    # Every element is written: each program owns its tile (rows past Lq/Lk masked).
    dq = torch.empty((b, hq, lq, d), device=q.device, dtype=q.dtype)
    (kv_m, kv_n, kv_warps, kv_stages), (q_m, q_n, q_warps, q_stages) = _bwd_blocks(d)
    meta = _meta(q)
    even_d = meta["BLOCK_D"] == d
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the softmax backward's row term.
    delta = torch.empty((b, hq, lq), device=q.device, dtype=torch.float32)
    _launch_delta(
        (_common.cdiv(lq, q_m), b * hq),
        o, do, delta,
        hq, lq, d,
        *o.stride()[:3], *do.stride(),
        BLOCK_M=q_m, BLOCK_D=meta["BLOCK_D"], num_warps=4,
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    # dK/dV: a tile of kv_n keys against kv_m queries at a time; dQ: q_m queries, q_n keys.
    groups = hq // hkv
    shares = _dkdv_split(_common.cdiv(lk, kv_n) * b * hkv, groups, _common.sms(q), causal,
                         lq * groups)
    # one share writes dK, dV in place; more write an fp32 slab each
    dk_out = torch.empty((shares, b, hkv, lk, d), device=q.device,
                         dtype=q.dtype if shares == 1 else torch.float32)
    dv_out = torch.empty_like(dk_out)
    _launch_bwd_dkdv(
        (_common.cdiv(lk, kv_n), shares * b * hkv),
        q, k, v, do, lse, delta, dk_out, dv_out,
        hq, hkv, groups, groups // shares, lq, lk, d, scale * _LOG2E, scale,
        *strides,
        CAUSAL=causal, EVEN_D=even_d, SPLIT=_SPLIT_MASKS, **meta,
        BLOCK_M=kv_m, BLOCK_N=kv_n, num_warps=kv_warps, num_stages=kv_stages,
    )
    if shares == 1:
        dk, dv = dk_out[0], dv_out[0]
    else:
        # fp32 partials summed in share order (deterministic), one rounding to the dtype
        dk, dv = dk_out.sum(0).to(q.dtype), dv_out.sum(0).to(q.dtype)
    _launch_bwd_dq(
        (_common.cdiv(lq, q_m), b * hq),
        q, k, v, do, lse, delta, dq,
        hq, hq // hkv, lq, lk, d, scale * _LOG2E, scale,
        *strides,
        CAUSAL=causal, EVEN_D=even_d, SPLIT=_SPLIT_MASKS, **meta,
        BLOCK_M=q_m, BLOCK_N=q_n, num_warps=q_warps, num_stages=q_stages,
    )
    return dq, dk, dv


def _attention_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal, scale)


_attention_op = torch.library.custom_op(
    "ryzen_opt::train_attention", mutates_args=()
)(_attention_impl)


@_attention_op.register_fake
def _(q, k, v, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attention_backward_impl(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, causal, scale)


_attention_backward_op = torch.library.custom_op(
    "ryzen_opt::train_attention_backward", mutates_args=()
)(_attention_backward_impl)


@_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        return None, None, None, None, None
    dq, dk, dv = _common.call(
        ctx, _attention_backward_op, _attention_backward_impl,
        do, q, k, v, o, lse, ctx.causal, ctx.scale,
    )
    return dq, dk, dv, None, None


_attention = _common.TrainingOp(_attention_op, _attention_impl, _setup_context, _grad)


def supports(q, k, v, causal=False, scale=None) -> str | None:
    """``None`` if the Triton training attention can serve this call, else the reason."""
    r = _common.reason("attention", q=q, k=k, v=v)
    if r is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        if q.shape[-1] > _MAX_HEAD_DIM:
            return f"q's head_dim is {q.shape[-1]}; the triton training attention takes <= 128"
        if isinstance(v, torch.Tensor) and v.shape[-1] != q.shape[-1]:
            return "v's head_dim differs from q's; the triton training attention needs them equal"
    return r


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Flash attention with a flash backward (see :func:`reference.attention`).

    Args:
        q: ``(B, Hq, Lq, D)``, float16/bfloat16/float32, ``D <= 128``, any strides.
        k, v: ``(B, Hkv, Lk, D)`` with ``Hkv`` dividing ``Hq``, in ``q``'s dtype.
        causal: bottom-right aligned causal masking (query ``i`` sees keys
            ``j <= i + Lk - Lq``).
        scale: softmax scale (default ``1/sqrt(D)``).

    Returns:
        ``(B, Hq, Lq, D)`` in ``q``'s dtype, differentiable in ``q``, ``k`` and ``v``; rows
        that see no key are zeros and pass no gradient.

    Example:
        >>> o = attention(q, k, v, causal=True)  # doctest: +SKIP
    """
    reference.check_attention_args(q, k, v, None, scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_device(name, t)
        _common.check_dtype(name, t)
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"q's head_dim is {q.shape[-1]}; the triton training attention "
                         f"takes <= {_MAX_HEAD_DIM}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _attention(q, k, v, bool(causal), scale)[0]
