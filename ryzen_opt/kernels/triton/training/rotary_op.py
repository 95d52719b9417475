"""Triton rotary position embedding (HF Llama's ``apply_rotary_pos_emb``), forward and
backward as one autograd op.

``x_rot = x * cos + rotate_half(x) * sin`` on ``q`` and ``k`` in SDPA layout ``(batch, heads,
seq, head_dim)``; ``cos``/``sin`` are ``(batch or 1, seq, head_dim)`` and broadcast over
heads. One program rotates BLOCK_S positions of one head: it reads both halves of ``x`` and
of ``cos``/``sin`` once and writes both halves of the result, where eager PyTorch runs a
negation, a concatenation, two products and a sum (five kernels per tensor).

The map is linear in ``x``: with halves ``x1, x2`` it is ``(x1 c1 - x2 s1, x2 c2 + x1 s2)``,
so backward applies the transpose ``(g1 c1 + g2 s2, g2 c2 - g1 s1)`` to the incoming
gradient: the inverse rotation when the halves of ``cos``/``sin`` are equal, as Llama's are.
``cos`` and ``sin`` get no gradient (they are position tables).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ryzen_opt.kernels import reference
from ryzen_opt.kernels.triton._launcher import CachedLauncher
from ryzen_opt.kernels.triton.training import _common

# fmt: off
# Kernel signatures and launches keep their arguments grouped by role (pointers, sizes,
# strides, meta-parameters) on shared lines, as STYLE.md asks.

_MAX_HEAD_DIM = 512


@triton.jit
def _rotary_kernel(
    # pointers
    x_ptr, cos_ptr, sin_ptr, o_ptr,
    # sizes
    H, S, HALF,
    # strides
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd,
    stride_ob, stride_oh, stride_os,
    # meta-parameters
    BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_s = (tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_s[:, None] < S) & (offs_d[None, :] < HALF)
    x1p = x_ptr + b * stride_xb + h * stride_xh + offs_s[:, None] * stride_xs \
        + offs_d[None, :] * stride_xd
    c1p = cos_ptr + b * stride_cb + offs_s[:, None] * stride_cs + offs_d[None, :] * stride_cd
    s1p = sin_ptr + b * stride_sb + offs_s[:, None] * stride_ss + offs_d[None, :] * stride_sd
    x1 = tl.load(x1p, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1p + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c1p, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c1p + HALF * stride_cd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s1p, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s1p + HALF * stride_sd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    op = o_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :]
    tl.store(op, o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(op + HALF, o2.to(o_ptr.dtype.element_ty), mask=mask)


_launch_rotary = CachedLauncher(_rotary_kernel, loose="ints")


def _rotate(x, cos, sin, backward):
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # contiguous
    if x.numel() == 0:
        return out
    b, h, s, d = x.shape
    half = d // 2
    block_half = _common.next_pow2(half)
    # ~2048 elements of each half per program (16 per thread over 4 warps).
    block_s = max(1, min(_common.next_pow2(s), 2048 // block_half))
    cb = 0 if cos.shape[0] == 1 else cos.stride(0)  # batch 1 broadcasts
    sb = 0 if sin.shape[0] == 1 else sin.stride(0)
    _launch_rotary(
        (b * h, _common.cdiv(s, block_s)),
        x, cos, sin, out,
        h, s, half,
        *x.stride(),
        cb, cos.stride(1), cos.stride(2), sb, sin.stride(1), sin.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BACKWARD=backward, BLOCK_S=block_s, BLOCK_HALF=block_half, num_warps=4,
    )
    return out


def _rotary_impl(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)


_rotary_op = torch.library.custom_op("ryzen_opt::train_rotary", mutates_args=())(_rotary_impl)


@_rotary_op.register_fake
def _(q, k, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rotary_backward_impl(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(dq, cos, sin, True), _rotate(dk, cos, sin, True)


_rotary_backward_op = torch.library.custom_op(
    "ryzen_opt::train_rotary_backward", mutates_args=()
)(_rotary_backward_impl)


@_rotary_backward_op.register_fake
def _(dq, dk, cos, sin):
    return dq.new_empty(dq.shape), dk.new_empty(dk.shape)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.shapes = (q.shape, k.shape, q.dtype)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    q_shape, k_shape, dtype = ctx.shapes
    if dq is None:
        dq = torch.zeros(q_shape, device=cos.device, dtype=dtype)
    if dk is None:
        dk = torch.zeros(k_shape, device=cos.device, dtype=dtype)
    dq_in, dk_in = _common.call(ctx, _rotary_backward_op, _rotary_backward_impl, dq, dk, cos, sin)
    return dq_in, dk_in, None, None


_rotary = _common.TrainingOp(_rotary_op, _rotary_impl, _setup_context, _backward)


def supports(q, k, cos, sin) -> str | None:
    """``None`` if the Triton rotary can serve this call, else the reason."""
    r = _common.reason("rotary", q=q, k=k, cos=cos, sin=sin)
    if r is None and isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[-1] > _MAX_HEAD_DIM:
        return f"q's head_dim is {q.shape[-1]}; the triton rotary supports <= {_MAX_HEAD_DIM}"
    return r


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q`` and ``k`` with a fused backward (see :func:`reference.rotary`).

    Args:
        q: ``(batch, q_heads, seq, head_dim)``, float16/bfloat16/float32, any strides, even
            ``head_dim <= 512``.
        k: ``(batch, kv_heads, seq, head_dim)`` in ``q``'s dtype.
        cos, sin: ``(batch or 1, seq, head_dim)``, any of the three dtypes (math in float32);
            they must not require a gradient.

    Returns:
        ``(q_rot, k_rot)``, contiguous, in ``q``'s dtype; differentiable in ``q`` and ``k``.

    Example:
        >>> q, k = rotary(q, k, cos, sin)  # cos, sin from LlamaRotaryEmbedding  # doctest: +SKIP
    """
    reference.check_rotary_args(q, k, cos, sin)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _common.check_device(name, t)
        _common.check_dtype(name, t)
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"q's head_dim is {q.shape[-1]}; the triton rotary supports <= 512")
    if _common.wants_grad(cos, sin):
        raise ValueError("cos and sin must not require grad: the triton rotary gives them none")
    return _rotary(q, k, cos, sin)
