"""Triton GELU (erf or tanh approximation), forward and fused backward as one autograd op.

Forward reads ``x`` once and writes ``gelu(x)``; backward reads ``x`` and the incoming
gradient once and writes ``dy * gelu'(x)``, recomputing the inner terms from ``x``. Math in
float32, results in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ryzen_opt.kernels import reference
from ryzen_opt.kernels.triton._launcher import CachedLauncher
from ryzen_opt.kernels.triton.training import _common, _elementwise

# fmt: off
# Kernel signatures keep their arguments grouped by role (pointers, sizes, strides,
# meta-parameters) on shared lines, as STYLE.md asks.

# Compiled kernels read module globals only as constexprs (the interpreter reads any).

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_SQRT_2_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)


@triton.jit
def _gelu_kernel(
    # pointers
    dy_ptr, x_ptr, out_ptr,
    # sizes
    N, BLOCKS_PER_ROW,
    # strides (rows; the last dim is contiguous)
    stride_dy, stride_x, stride_o,
    # meta-parameters
    TANH: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // BLOCKS_PER_ROW).to(tl.int64)
    cols = (pid % BLOCKS_PER_ROW).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if TANH:
        # tanh(u) = 2 * sigmoid(2u) - 1, so 0.5 * (1 + tanh(u)) = sigmoid(2u).
        u = _SQRT_2_PI * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * u)
        if BACKWARD:
            # d/dx [x * s] = s + x * 2 s (1 - s) * du/dx, du/dx = sqrt(2/pi) (1 + 3 0.044715 x^2)
            du = _SQRT_2_PI * (1.0 + 0.134145 * x * x)
            out = s + 2.0 * x * s * (1.0 - s) * du
        else:
            out = x * s
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
        out = cdf + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x) if BACKWARD else x * cdf
    if BACKWARD:
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        out = dy * out
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


_launch_gelu = CachedLauncher(_gelu_kernel, loose="ints")


def _launch(x, approximate, dy=None):
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if x.numel() == 0:
        return out
    if dy is None:
        x2, dy2 = _common.flat_pair(x, x)
    else:
        x2, dy2 = _common.flat_pair(x, dy)
    n_rows, n = x2.shape
    o2 = out.view(n_rows, n)
    _launch_gelu(
        _elementwise.grid(n_rows, n),
        dy2, x2, o2,
        n, _common.cdiv(n, _elementwise.BLOCK),
        dy2.stride(0), x2.stride(0), o2.stride(0),
        TANH=approximate == "tanh", BACKWARD=dy is not None, BLOCK=_elementwise.BLOCK,
        num_warps=_elementwise.NUM_WARPS,
    )
    return out


def _gelu_impl(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return _launch(x, approximate)


_gelu_op = torch.library.custom_op("ryzen_opt::train_gelu", mutates_args=())(_gelu_impl)


@_gelu_op.register_fake
def _(x, approximate):
    return x.new_empty(x.shape)


def _gelu_backward_impl(dy: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    return _launch(x, approximate, dy)


_gelu_backward_op = torch.library.custom_op(
    "ryzen_opt::train_gelu_backward", mutates_args=()
)(_gelu_backward_impl)


@_gelu_backward_op.register_fake
def _(dy, x, approximate):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, approximate = inputs
    ctx.save_for_backward(x)
    ctx.approximate = approximate


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _common.call(ctx, _gelu_backward_op, _gelu_backward_impl, dy, x, ctx.approximate), None


_gelu = _common.TrainingOp(_gelu_op, _gelu_impl, _setup_context, _backward)


def supports(x, approximate="none") -> str | None:
    """``None`` if the Triton gelu can serve this call, else the reason."""
    if approximate not in reference.GELU_APPROXIMATIONS:
        return f"approximate={approximate!r} is not one of {reference.GELU_APPROXIMATIONS}"
    return _common.reason("gelu", x=x)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x, approximate=approximate)`` with a fused backward (see :func:`reference.gelu`).

    Args:
        x: float16/bfloat16/float32, any shape and strides.
        approximate: ``"none"`` (erf) or ``"tanh"``.

    Returns:
        A new contiguous tensor of ``x``'s shape and dtype; differentiable in ``x``.

    Example:
        >>> y = gelu(x @ w_fc.T + b_fc, approximate="tanh")  # doctest: +SKIP
    """
    reference.check_gelu_args(x, approximate)
    _common.check_device("x", x)
    _common.check_dtype("x", x)
    return _gelu(x, approximate)
