"""Triton flash-attention forward: online softmax over key tiles held in SRAM.

``softmax(q k^T * scale) v`` in SDPA layout ``(batch, heads, seq, head_dim)`` with grouped
query heads, bottom-right aligned causal masking when ``q_len != k_len`` and zeros for query
rows that see no key (see :mod:`ryzen_opt.kernels.reference`). One program owns BLOCK_M
query rows of one head and streams every key tile it may see; the (BLOCK_M, Lk) score
matrix never reaches device memory.

Key tiles are split in two loops: tiles every row of the program sees in full run without
masks; only the last partial tile and the tiles crossing the causal diagonal pay for the
``where``. At Lq = Lk = 4096, BLOCK = 128, that is 1 masked tile of 32 per causal program.
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
# The folded scale (see _attn_tiles) on unmasked tiles; False only to measure it against the
# scale-first form in one process.
_FOLD_SCALE = True
_LOG2E = 1.4426950408889634


def _attn_configs():
    if _common.INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_stages=1, num_warps=4)]
    out = []
    for bm, bn, stages, warps in (
        (128, 128, 3, 8),
        (128, 64, 3, 8),
        (128, 64, 4, 4),
        (128, 64, 4, 8),
        (128, 128, 2, 8),
        (64, 64, 3, 4),
        (64, 32, 2, 4),
    ):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages,
                                 num_warps=warps))
    return out


def _prune_attn(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    elt = named_args["q_ptr"].element_size()
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        # K and V tiles per stage: 2 * bn * d * elt; d=256 at bn=128 is 128 KB/stage in bf16.
        if c.num_stages * 2 * bn * d * elt > 160 * 1024:
            continue
        # The fp32 accumulator is bm * d / (32 * warps) registers per thread; past 64 the
        # score tile and the accumulator spill (bm=128, d=256, 4 warps = 256 registers).
        if bm * d // (32 * c.num_warps) > 64:
            continue
        kept.append(c)
    return kept or configs[-1:]


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, lo, hi, Lk, diag, qk_scale, HEAD_DIM,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, FOLD_SCALE: tl.constexpr,
):
    # FOLD_SCALE (qk_scale >= 0): on unmasked tiles the row max is taken of the raw scores and
    # scaled once per row, and the scale and the max subtraction are one FMA per score
    # (max(s * x) = s * max(x) only for s >= 0): one pass over the score tile fewer.
    offs_n0 = tl.arange(0, BLOCK_N)
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            kv_mask = (offs_n[:, None] < Lk) & d_mask
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        if MASKED or not FOLD_SCALE:
            qk = qk * qk_scale
            if MASKED:
                keep = offs_n[None, :] < Lk
                if CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
                qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row with every key masked so far keeps m = -inf; subtracting 0 instead keeps
            # exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new) if MASKED else m_new
            p = tl.math.exp2(qk - m_sub[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_sub = m_new
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)  # 0 * garbage could be NaN
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_attn_configs(),
    key=["LQ_KEY", "LK_KEY", "BLOCK_D", "CAUSAL", "FOLD_SCALE"],
    prune_configs_by={"early_config_prune": _prune_attn},
)
@triton.jit
def _attn_fwd_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, o_ptr,
    # sizes
    H, GROUPS, Lq, Lk, LQ_KEY, LK_KEY, HEAD_DIM, qk_scale,
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    # meta-parameters
    CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, FOLD_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        # Later query tiles see more keys: start them first so the tail of the grid is short.
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUPS).to(tl.int64)
    h = h.to(tl.int64)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    o_base = o_ptr + b * stride_ob + h * stride_oh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m[:, None] < Lq
    io_mask = row_mask if EVEN_D else row_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    diag = Lk - Lq  # bottom-right alignment: row i sees keys j <= i + diag
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
    # Rows that saw no key have l = 0 and acc = 0: dividing by 1 gives the defined zeros.
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=io_mask)


def supports(q, k, v, causal=False, scale=None, attn_mask=None) -> str | None:
    """``None`` if the Triton attention can serve this call, else the reason."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return None  # the launcher raises the TypeError
    if attn_mask is not None:
        return "the triton attention takes no attn_mask (causal=True is supported)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if reason := _common.device_reason(name, t):
            return reason
    if q.dtype not in _common.KERNEL_DTYPES:
        return f"q is {q.dtype}; the triton attention takes float16, bfloat16 or float32"
    if q.dim() == 4 and q.shape[-1] > _MAX_HEAD_DIM:
        return f"q's head_dim is {q.shape[-1]}; the triton attention supports up to 256"
    return None


def _launch(q, k, v, causal, scale):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    o = torch.empty((b, hq, lq, d), device=q.device, dtype=q.dtype)
    if o.numel() == 0:
        return o
    if lk == 0:
        return o.zero_()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    block_d = max(16, _common.next_pow2(d))

    def grid(META):
        return (_common.cdiv(lq, META["BLOCK_M"]), b * hq)

    args = (
        q, k, v, o,
        hq, hq // hkv, lq, lk, _common.pow2_bucket(lq), _common.pow2_bucket(lk), d,
        scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
    )
    meta = {
        "CAUSAL": bool(causal), "BLOCK_D": block_d, "EVEN_D": block_d == d,
        "INPUT_PRECISION": _common.dot_precision(q.dtype), "UPCAST": _common.upcast_dot(q.dtype),
        "FOLD_SCALE": _FOLD_SCALE and scale >= 0,
    }
    if not _common.INTERPRET and b * hq * lq * lk * d < 2**31:
        # Under 2**31 score-MACs the call takes tens of microseconds: one fixed config rather
        # than compiling and timing six.
        small = {"BLOCK_M": 64, "BLOCK_N": 32 if block_d > 128 else 64, "num_warps": 4,
                 "num_stages": 2}
        _launch_fwd_fixed(grid, *args, **meta, **small)
    else:
        _launch_fwd(grid, *args, **meta)
    return o


# Small eager calls are bound by host time: launch the compiled kernel directly (see _launcher).
# Lengths and the strides they scale vary between prefills; the autotune key reads only their
# power-of-two buckets, so they are keyed on Triton's own specialization.
_LENGTHS = ("Lq", "Lk", "stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_vb",
            "stride_vh", "stride_ob", "stride_oh")
_launch_fwd = CachedLauncher(_attn_fwd_kernel, loose=_LENGTHS)
_launch_fwd_fixed = CachedLauncher(_attn_fwd_kernel.fn, loose=_LENGTHS)


@torch.library.custom_op("ryzen_opt::triton_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None
) -> torch.Tensor:
    return _launch(q, k, v, causal, scale)


@_attention_op.register_fake
def _(q, k, v, causal, scale):
    return q.new_empty(q.shape)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flash-attention forward on the GPU (see :func:`reference.attention`).

    Args:
        q: ``(B, Hq, Lq, D)``, float16/bfloat16/float32, ``D <= 256``, any strides.
        k, v: ``(B, Hkv, Lk, D)`` with ``Hkv`` dividing ``Hq``.
        causal: bottom-right aligned causal masking.
        scale: softmax scale (default ``1/sqrt(D)``).
        attn_mask: must be ``None`` (``supports`` reports it otherwise).

    Returns:
        ``(B, Hq, Lq, D)`` in ``q.dtype``.

    Example:
        >>> o = attention(q, k, v, causal=True)  # doctest: +SKIP
    """
    reference.check_attention_args(q, k, v, attn_mask, scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_device(name, t)
    if attn_mask is not None:
        raise ValueError("attn_mask must be None for the triton attention (use causal=True)")
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"q's head_dim is {q.shape[-1]}; the triton attention supports <= 256")
    if q.dtype not in _common.KERNEL_DTYPES:
        raise TypeError(f"q is {q.dtype}; the triton attention takes float16, bfloat16, float32")
    scale = None if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, bool(causal), scale)
    return _launch(q, k, v, bool(causal), scale)  # eager: no custom-op dispatch (see matmul)


registry.register(
    "attention", "triton", _common.DEVICES, attention, supports=supports,
    available=_common.available,
)
