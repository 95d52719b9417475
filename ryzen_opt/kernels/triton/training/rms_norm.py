"""Triton RMSNorm fused with the residual add, forward and backward, as one autograd op.

``h = x + residual`` and ``y = h / sqrt(mean(h**2) + eps) * weight`` in one pass over the
rows (Llama/Qwen2's pre-norm block); backward writes the gradient of ``h`` (including the
gradient arriving at ``h`` from the residual stream) in one pass and the weight gradient as
float32 row sums. Kernels: :mod:`ryzen_opt.kernels.triton.training._norm`.
"""

from __future__ import annotations

import torch

from ryzen_opt.kernels import reference
from ryzen_opt.kernels.triton.training import _common, _norm, _norm_ops


def _rms_norm_impl(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, _, rstd = _norm.forward(x, residual, weight, None, eps, rms=True)
    return y, h, rstd


_rms_norm_op = torch.library.custom_op("ryzen_opt::train_rms_norm", mutates_args=())(_rms_norm_impl)


@_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    h = x.new_empty(x.shape if residual is not None else (0,))
    return x.new_empty(x.shape), h, x.new_empty((rows,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, residual, weight, _ = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = False
    ctx.weight_needs_grad = weight is not None and weight.requires_grad
    ctx.bias_needs_grad = False
    empty = rstd.new_empty(0)
    ctx.save_for_backward(
        h if residual is not None else x, weight if weight is not None else empty, empty, rstd
    )


def _backward(ctx, dy, dh_out, _drstd):
    dx, dres, dw, _ = _norm_ops.backward(ctx, dy, dh_out, rms=True)
    return dx, dres, dw, None


_rms_norm = _common.TrainingOp(_rms_norm_op, _rms_norm_impl, _setup_context, _backward)


def supports(x, residual, weight, eps=1e-6) -> str | None:
    """``None`` if the Triton rms_norm_residual can serve this call, else the reason."""
    return _norm.supports("rms_norm_residual", x, residual, weight, None)


def rms_norm_residual(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``h = x + residual`` with fused backward (see
    :func:`reference.rms_norm_residual`).

    Args:
        x: ``(..., N)``, float16/bfloat16/float32, ``N <= 65536``, any strides.
        residual: ``None`` (then ``h = x``) or a tensor of ``x``'s shape and dtype.
        weight: ``None`` or ``(N,)`` of any of the three dtypes (math in float32).
        eps: added to the mean square, finite and ``>= 0``.

    Returns:
        ``(y, h)``: ``y`` in ``x``'s dtype and ``h`` (``x`` itself when ``residual`` is
        ``None``); both differentiable, statistics and gradients accumulated in float32.

    Example:
        >>> y, h = rms_norm_residual(attn_out, h, layer.weight, 1e-6)  # doctest: +SKIP
    """
    reference.check_norm_residual_args(x, residual, weight, None, eps)
    _norm.check("rms_norm_residual", x, residual, weight, None)
    y, h, _ = _rms_norm(x, residual, weight, float(eps))
    return y, (h if residual is not None else x)
