"""Triton SwiGLU, ``silu(gate) * up``, forward and fused backward as one autograd op.

Forward reads ``gate`` and ``up`` once and writes the product; backward reads ``gate``,
``up`` and the incoming gradient once and writes both input gradients, recomputing
``sigmoid(gate)`` rather than saving an activation (eager PyTorch also saves ``silu(gate)``
and runs two kernels forward, three backward). Math in float32, results in the input
dtype.
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


@triton.jit
def _swiglu_kernel(
    # pointers
    dy_ptr, g_ptr, u_ptr, out_ptr, du_ptr,
    # sizes
    N, BLOCKS_PER_ROW,
    # strides (rows; the last dim is contiguous)
    stride_dy, stride_g, stride_u, stride_o, stride_du,
    # meta-parameters
    BACKWARD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // BLOCKS_PER_ROW).to(tl.int64)
    cols = (pid % BLOCKS_PER_ROW).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    if BACKWARD:
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        # d silu / dg = sig * (1 + g * (1 - sig))
        dg = dy * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(out_ptr + row * stride_o + cols, dg.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + row * stride_du + cols, (dy * silu).to(du_ptr.dtype.element_ty),
                 mask=mask)
    else:
        tl.store(out_ptr + row * stride_o + cols, (silu * u).to(out_ptr.dtype.element_ty),
                 mask=mask)


_launch_swiglu = CachedLauncher(_swiglu_kernel, loose="ints")


def _launch(gate, up, dy=None):
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    du = torch.empty_like(out) if dy is not None else out
    if gate.numel() == 0:
        return out, du
    g2, u2 = _common.flat_pair(gate, up)
    n_rows, n = g2.shape
    dy2 = _common.rows(dy, n) if dy is not None else g2
    o2, du2 = out.view(n_rows, n), du.view(n_rows, n)
    _launch_swiglu(
        _elementwise.grid(n_rows, n),
        dy2, g2, u2, o2, du2,
        n, _common.cdiv(n, _elementwise.BLOCK),
        dy2.stride(0), g2.stride(0), u2.stride(0), o2.stride(0), du2.stride(0),
        BACKWARD=dy is not None, BLOCK=_elementwise.BLOCK, num_warps=_elementwise.NUM_WARPS,
    )
    return out, du


def _swiglu_impl(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _launch(gate, up)[0]


_swiglu_op = torch.library.custom_op("ryzen_opt::train_swiglu", mutates_args=())(_swiglu_impl)


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


def _swiglu_backward_impl(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(gate, up, dy)


_swiglu_backward_op = torch.library.custom_op(
    "ryzen_opt::train_swiglu_backward", mutates_args=()
)(_swiglu_backward_impl)


@_swiglu_backward_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return _common.call(ctx, _swiglu_backward_op, _swiglu_backward_impl, dy, gate, up)


_swiglu = _common.TrainingOp(_swiglu_op, _swiglu_impl, _setup_context, _backward)


def supports(gate, up) -> str | None:
    """``None`` if the Triton swiglu can serve this call, else the reason."""
    return _common.reason("swiglu", gate=gate, up=up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with a fused backward (see :func:`reference.swiglu`).

    Args:
        gate, up: same shape, same float16/bfloat16/float32 dtype, any strides (views whose
            last dim is contiguous are read in place).

    Returns:
        A new contiguous tensor of ``gate``'s shape and dtype; differentiable in both inputs.

    Example:
        >>> y = swiglu(x @ w_gate.T, x @ w_up.T)  # doctest: +SKIP
    """
    reference.check_swiglu_args(gate, up)
    _common.check_device("gate", gate)
    _common.check_device("up", up)
    _common.check_dtype("gate", gate)
    return _swiglu(gate, up)
