"""Triton decode attention ("flash-decoding"): one query token per row against a KV cache.

Decode is bandwidth-bound: each step reads the whole valid cache once (B * Hkv * len * D * 2
tensors * 2 bytes; 8 x 8 x 32k x 128 bf16 is 1.07 GB) for 4 FLOP per byte. One program per
(batch, kv head) would be 64 programs for 132 SMs at batch 8, so the cache is cut along its
length into splits:

* ``_decode_split_kernel``: grid (splits, B * Hkv). Each program streams one chunk of one kv
  head's cache for all ``Hq / Hkv`` query heads that share it (K/V read once per group) and
  writes an unnormalised partial output with its running max and sum.
* ``_decode_reduce_kernel``: grid (B * Hq,). Rescales and sums the partials.

Splits are planned from the cache's ``max_len`` so no length is read back to the host; chunks
past a row's ``cache_lengths[b]`` exit after one load.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ryzen_opt.kernels import reference, registry
from ryzen_opt.kernels.triton import _common
from ryzen_opt.kernels.triton._launcher import CachedLauncher

# fmt: off
# Kernel signatures and launches keep their arguments grouped by role (pointers, sizes,
# strides, meta-parameters) on shared lines, as STYLE.md asks; the formatter would split them
# one per line.

_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
# Chunks are multiples of 128 keys and at least 256 deep: shorter chunks spend more time in
# the prologue (q load, partial store) than in streaming.
_CHUNK_QUANTUM = 128
_MIN_CHUNK = 256


def _decode_configs():
    if _common.INTERPRET:
        return [triton.Config({"BLOCK_N": 32}, num_stages=1, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": bn}, num_stages=s, num_warps=w)
        for bn, s, w in ((64, 3, 4), (64, 4, 4), (128, 3, 4), (128, 2, 8), (32, 4, 4))
    ]


def _prune_decode(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    # K and V tiles per stage (bn * d * 2 tensors * 2 B) must fit ~160 KB of shared memory.
    return [c for c in configs if c.num_stages * c.kwargs["BLOCK_N"] * d * 4 <= 160 * 1024]


@triton.jit
def _decode_tiles(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_d, lo, hi, HEAD_DIM, qk_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            kv_mask = (offs_n[:, None] < hi) & d_mask
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_mask, other=0.0)
            v = tl.load(v_ptrs, mask=d_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        if MASKED:
            qk = tl.where(offs_n[None, :] < hi, qk, float("-inf"))
        # Every tile holds at least one valid key, so m_new is finite after the first tile.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_decode_configs(),
    key=["ROWS_KEY", "CHUNK", "BLOCK_D", "BLOCK_G"],
    prune_configs_by={"early_config_prune": _prune_decode},
)
@triton.jit
def _decode_split_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, len_ptr, acc_ptr, ml_ptr,
    # sizes
    HKV, GROUPS, MAX_LEN, CHUNK, ROWS_KEY, HEAD_DIM, qk_scale,
    # strides (partials: acc (B, Hq, S, BLOCK_D) and ml (2, B, Hq, S), contiguous)
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    NUM_SPLITS,
    # meta-parameters
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    length = min(tl.load(len_ptr + b).to(tl.int32), MAX_LEN)
    lo = pid_s * CHUNK
    hi = min(lo + CHUNK, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = hk * GROUPS + offs_g
    g_mask = offs_g < GROUPS
    b64 = b.to(tl.int64)
    q_ptrs = q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=g_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    full_end = lo + max(hi - lo, 0) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _decode_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_d, lo, full_end, HEAD_DIM, qk_scale,
        False, EVEN_D, INPUT_PRECISION, UPCAST, BLOCK_N,
    )
    acc, l_i, m_i = _decode_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_d, full_end, hi, HEAD_DIM, qk_scale,
        True, EVEN_D, INPUT_PRECISION, UPCAST, BLOCK_N,
    )

    # Partials, indexed [b, head, split]; an empty chunk stores m = -inf, l = 0, acc = 0.
    hq = HKV * GROUPS
    row = (b64 * hq + heads) * NUM_SPLITS + pid_s
    tl.store(acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_mask[:, None])
    total = tl.num_programs(1).to(tl.int64) * GROUPS * NUM_SPLITS
    tl.store(ml_ptr + row, m_i, mask=g_mask)
    tl.store(ml_ptr + total + row, l_i, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    # pointers
    acc_ptr, ml_ptr, o_ptr,
    # sizes
    NUM_SPLITS, TOTAL, HQ, HEAD_DIM,
    # strides
    stride_ob, stride_oh, stride_od,
    # meta-parameters
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * Hq + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    m = tl.load(ml_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    l_s = tl.load(ml_ptr + TOTAL + row * NUM_SPLITS + offs_s, mask=s_mask, other=0.0)
    acc = tl.load(acc_ptr + (row * NUM_SPLITS + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                  mask=s_mask[:, None], other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # a row of length 0
    w = tl.math.exp2(m - m_max)
    denom = tl.sum(l_s * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    b = row // HQ
    h = row % HQ
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _plan_splits(rows: int, max_len: int, sms: int) -> tuple[int, int]:
    """(splits, chunk): ~4 programs per SM (enough loads in flight to saturate HBM)."""
    max_chunks = max(1, _common.cdiv(max_len, _MIN_CHUNK))
    splits = max(1, min(max_chunks, _common.cdiv(4 * sms, rows)))
    chunk = _common.cdiv(_common.cdiv(max_len, splits), _CHUNK_QUANTUM) * _CHUNK_QUANTUM
    return _common.cdiv(max_len, chunk), chunk


def supports(q, k_cache, v_cache, cache_lengths, scale=None) -> str | None:
    """``None`` if the Triton decode attention can serve this call, else the reason."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k_cache, v_cache)):
        return None
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if reason := _common.device_reason(name, t):
            return reason
    if q.dtype not in _common.KERNEL_DTYPES:
        return f"q is {q.dtype}; the triton decode attention takes float16, bfloat16, float32"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"q's head_dim is {q.shape[-1]}; the triton decode attention supports <= 256"
    return None


def _launch(q, k_cache, v_cache, cache_lengths, scale):
    b, hq, d = q.shape
    hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    o = torch.empty((b, hq, d), device=q.device, dtype=q.dtype)
    if o.numel() == 0:
        return o
    if max_len == 0:
        return o.zero_()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    groups = hq // hkv
    block_d = max(16, _common.next_pow2(d))
    block_g = max(16, _common.next_pow2(groups))  # tl.dot takes M >= 16
    splits, chunk = _plan_splits(b * hkv, max_len, _common.num_sms(_common.device_index(q)))
    lengths = cache_lengths.to(device=q.device)
    # The partials are written before they are read: per-stream scratch, kept between calls.
    part_acc = _common.stream_scratch("decode_acc", q.device, b * hq * splits * block_d,
                                      torch.float32)
    part_ml = _common.stream_scratch("decode_ml", q.device, 2 * b * hq * splits, torch.float32)
    args = (
        q, k_cache, v_cache, lengths, part_acc, part_ml,
        hkv, groups, max_len, chunk, _common.pow2_bucket(b * hkv), d, scale * _LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), splits,
    )
    meta = {
        "BLOCK_G": block_g, "BLOCK_D": block_d, "EVEN_D": block_d == d,
        "INPUT_PRECISION": _common.dot_precision(q.dtype), "UPCAST": _common.upcast_dot(q.dtype),
    }
    if not _common.INTERPRET and b * hkv * max_len * d < 2**24:
        # Caches under 32 MB (bf16) stream in ~10 us: one fixed config, no autotuning.
        _launch_split_fixed((splits, b * hkv), *args, **meta, BLOCK_N=64, num_warps=4,
                            num_stages=2)
    else:
        _launch_split((splits, b * hkv), *args, **meta)
    _launch_reduce(
        (b * hq,), part_acc, part_ml, o, splits, b * hq * splits, hq, d, *o.stride(),
        BLOCK_S=_common.next_pow2(splits), BLOCK_D=block_d, num_warps=4,
    )
    return o


# Decode calls are bound by host time: launch the compiled kernels directly (see _launcher).
# A cache that grows by one position per step changes its length, batch/head strides and the
# split count every call; no heuristic or autotune key reads them, so they are keyed on
# Triton's own specialization (CHUNK, an autotune key, stays exact).
_GROWING = ("MAX_LEN", "stride_kb", "stride_kh", "stride_vb", "stride_vh", "NUM_SPLITS")
_launch_split = CachedLauncher(_decode_split_kernel, loose=_GROWING)
_launch_split_fixed = CachedLauncher(_decode_split_kernel.fn, loose=_GROWING)
_launch_reduce = CachedLauncher(_decode_reduce_kernel, loose=("NUM_SPLITS", "TOTAL"))


@torch.library.custom_op("ryzen_opt::triton_decode_attention", mutates_args=())
def _decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lengths: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    return _launch(q, k_cache, v_cache, cache_lengths, scale)


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_lengths, scale):
    return q.new_empty(q.shape)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Split-K decode attention on the GPU (see :func:`reference.decode_attention`).

    Args:
        q: ``(B, Hq, D)``, the new token's queries; ``D <= 256``.
        k_cache, v_cache: ``(B, Hkv, max_len, D)``, any strides; ``Hkv`` divides ``Hq``.
        cache_lengths: ``(B,)`` int32/int64, valid length of each row.
        scale: softmax scale (default ``1/sqrt(D)``).

    Returns:
        ``(B, Hq, D)`` in ``q.dtype``; rows of length 0 are zeros.

    Example:
        >>> o = decode_attention(q, k_cache, v_cache, lengths)  # doctest: +SKIP
    """
    reference.check_decode_args(q, k_cache, v_cache, cache_lengths, scale)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _common.check_device(name, t)
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"q's head_dim is {q.shape[-1]}; the triton decode supports <= 256")
    if q.dtype not in _common.KERNEL_DTYPES:
        raise TypeError(f"q is {q.dtype}; the triton decode takes float16, bfloat16, float32")
    scale = None if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return _decode_op(q, k_cache, v_cache, cache_lengths, scale)
    return _launch(q, k_cache, v_cache, cache_lengths, scale)  # eager: no custom-op dispatch


registry.register(
    "decode_attention", "triton", _common.DEVICES, decode_attention, supports=supports,
    available=_common.available,
)
