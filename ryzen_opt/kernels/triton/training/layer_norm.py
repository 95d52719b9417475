"""Triton LayerNorm fused with the residual add, forward and backward, as one autograd op.

``h = x + residual`` and ``y = (h - mean) / sqrt(var + eps) * weight + bias`` in one pass
over the rows (GPT-2's and the seed model's pre-LN block); backward writes the gradient of
``h`` (including the gradient arriving at ``h`` from the residual stream) in one pass and
the weight and bias gradients as float32 row sums. Kernels:
:mod:`ryzen_opt.kernels.triton.training._norm`.
"""

from __future__ import annotations

import torch

from ryzen_opt.kernels import reference
from ryzen_opt.kernels.triton.training import _common, _norm, _norm_ops


def _layer_norm_impl(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _norm.forward(x, residual, weight, bias, eps, rms=False)


_layer_norm_op = torch.library.custom_op(
    "ryzen_opt::train_layer_norm", mutates_args=()
)(_layer_norm_impl)


@_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    h = x.new_empty(x.shape if residual is not None else (0,))
    stat = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty(x.shape), h, stat, stat.new_empty((rows,))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _ = inputs
    _, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    ctx.weight_needs_grad = weight is not None and weight.requires_grad
    ctx.bias_needs_grad = bias is not None and bias.requires_grad
    ctx.save_for_backward(
        h if residual is not None else x,
        weight if weight is not None else rstd.new_empty(0),
        mean,
        rstd,
    )


def _backward(ctx, dy, dh_out, _dmean, _drstd):
    dx, dres, dw, db = _norm_ops.backward(ctx, dy, dh_out, rms=False)
    return dx, dres, dw, db, None


_layer_norm = _common.TrainingOp(_layer_norm_op, _layer_norm_impl, _setup_context, _backward)


def supports(x, residual, weight, bias, eps=1e-5) -> str | None:
    """``None`` if the Triton layer_norm_residual can serve this call, else the reason."""
    return _norm.supports("layer_norm_residual", x, residual, weight, bias)


def layer_norm_residual(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of ``h = x + residual`` with fused backward (see
    :func:`reference.layer_norm_residual`).

    Args:
        x: ``(..., N)``, float16/bfloat16/float32, ``N <= 65536``, any strides.
        residual: ``None`` (then ``h = x``) or a tensor of ``x``'s shape and dtype.
        weight, bias: ``None`` or ``(N,)``, one dtype between them (math in float32).
        eps: added to the variance, finite and ``>= 0``.

    Returns:
        ``(y, h)``: ``y`` in ``x``'s dtype and ``h`` (``x`` itself when ``residual`` is
        ``None``); both differentiable, statistics and gradients accumulated in float32.

    Example:
        >>> y, h = layer_norm_residual(attn_out, h, ln.weight, ln.bias, 1e-5)  # doctest: +SKIP
    """
    reference.check_norm_residual_args(x, residual, weight, bias, eps)
    _norm.check("layer_norm_residual", x, residual, weight, bias)
    y, h, _, _ = _layer_norm(x, residual, weight, bias, float(eps))
    return y, (h if residual is not None else x)
