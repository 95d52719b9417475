"""Triton training ops: forward and backward kernels registered as ``torch.library`` custom
ops with autograd, one op a module.

Each op takes the reference signature of :mod:`ryzen_opt.kernels.reference`, checks its
arguments (errors name the argument), and has a ``supports(...)`` predicate in its module
that returns ``None`` or the reason it cannot serve the input. They run on CUDA tensors, and
on CPU tensors only under ``TRITON_INTERPRET=1``; elsewhere they raise ``ValueError`` and the
caller uses the reference.
"""

from ryzen_opt.kernels.triton.training.cross_entropy import linear_cross_entropy
from ryzen_opt.kernels.triton.training.gelu import gelu
from ryzen_opt.kernels.triton.training.layer_norm import layer_norm_residual
from ryzen_opt.kernels.triton.training.rms_norm import rms_norm_residual
from ryzen_opt.kernels.triton.training.rotary import rotary
from ryzen_opt.kernels.triton.training.swiglu import swiglu

__all__ = [
    "gelu",
    "layer_norm_residual",
    "linear_cross_entropy",
    "rms_norm_residual",
    "rotary",
    "swiglu",
]
