"""The backward custom op shared by the RMSNorm and LayerNorm training ops."""

from __future__ import annotations

import torch

from ryzen_opt.kernels.triton.training import _common, _norm


def norm_backward_impl(
    dy: torch.Tensor,
    dh_out: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rms: bool,
    want_dw: bool,
    want_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _norm.backward(dy, dh_out, h, weight, mean, rstd, rms, want_dw, want_db)


norm_backward_op = torch.library.custom_op(
    "ryzen_opt::train_norm_backward", mutates_args=()
)(norm_backward_impl)


@norm_backward_op.register_fake
def _(dy, dh_out, h, weight, mean, rstd, rms, want_dw, want_db):
    n = h.shape[-1]
    wdt = weight.dtype if weight is not None else h.dtype
    return (
        h.new_empty(h.shape),
        h.new_empty((n,) if want_dw else (0,), dtype=wdt),
        h.new_empty((n,) if want_db else (0,), dtype=wdt),
    )


def backward(ctx, dy, dh_out, rms):
    """The autograd formula of both norms: ``(dx, dresidual, dweight, dbias)``."""
    h, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    if not ctx.has_residual:
        dh_out = None  # the op's h output is an empty placeholder; h is x itself
    want_dw = weight is not None and ctx.weight_needs_grad
    want_db = ctx.has_bias and ctx.bias_needs_grad
    dh, dw, db = _common.call(
        ctx,
        norm_backward_op,
        norm_backward_impl,
        dy,
        dh_out,
        h,
        weight if weight is not None and weight.numel() else None,
        mean,
        rstd,
        rms,
        want_dw,
        want_db,
    )
    # x and residual receive the same gradient, as from an eager ``x + residual``.
    return (
        dh,
        (dh if ctx.has_residual else None),
        (dw if want_dw else None),
        (db if want_db else None),
    )
