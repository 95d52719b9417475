"""Triton training ops: forward and backward kernels registered as ``torch.library`` custom
ops with autograd, one op a module.

Each op takes the reference signature of :mod:`ryzen_opt.kernels.reference`, checks its
arguments (errors name the argument), and has a ``supports(...)`` predicate in its module
that returns ``None`` or the reason it cannot serve the input. They run on CUDA tensors, and
on CPU tensors only under ``TRITON_INTERPRET=1``; elsewhere they raise ``ValueError`` and the
caller uses the reference.

The modules are named after their op (``gelu_op`` for :func:`gelu`, ``cross_entropy`` for
:func:`linear_cross_entropy`...) so that the re-exported functions do not shadow them;
:data:`SUPPORTS` maps each public op name to its module's ``supports``.
"""

from ryzen_opt.kernels.triton.training import (
    attention_op,
    cross_entropy,
    gelu_op,
    layer_norm,
    rms_norm,
    rotary_op,
    swiglu_op,
)
from ryzen_opt.kernels.triton.training.attention_op import attention
from ryzen_opt.kernels.triton.training.cross_entropy import linear_cross_entropy
from ryzen_opt.kernels.triton.training.gelu_op import gelu
from ryzen_opt.kernels.triton.training.layer_norm import layer_norm_residual
from ryzen_opt.kernels.triton.training.rms_norm import rms_norm_residual
from ryzen_opt.kernels.triton.training.rotary_op import rotary
from ryzen_opt.kernels.triton.training.swiglu_op import swiglu

SUPPORTS = {
    "linear_cross_entropy": cross_entropy.supports,
    "rms_norm_residual": rms_norm.supports,
    "layer_norm_residual": layer_norm.supports,
    "swiglu": swiglu_op.supports,
    "gelu": gelu_op.supports,
    "rotary": rotary_op.supports,
    "attention": attention_op.supports,
}
"""Each op's ``supports(...)`` predicate (same arguments as the op): ``None`` or the reason."""

__all__ = [
    "SUPPORTS",
    "attention",
    "gelu",
    "layer_norm_residual",
    "linear_cross_entropy",
    "rms_norm_residual",
    "rotary",
    "swiglu",
]
