"""Helpers shared by the training ops: device and dtype checks, row views, grad flags.

Every op here runs its Triton kernels on CUDA tensors, and on CPU tensors only under
``TRITON_INTERPRET=1`` (CPU CI). On CPU tensors without the interpreter the launchers raise
``ValueError`` naming the argument: they never fall back silently. The caller (for training,
``optimize_training``) asks ``supports(...)`` first and uses the reference when it says no.
"""

from __future__ import annotations

import torch

from ryzen_opt.kernels.triton import _common

KERNEL_DTYPES = _common.KERNEL_DTYPES
INTERPRET = _common.INTERPRET


def check_device(name: str, t: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming ``name`` if ``t`` cannot feed a Triton kernel here."""
    if t is not None:
        _common.check_device(name, t)


def check_dtype(name: str, t: torch.Tensor | None) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``t`` is float16, bfloat16 or float32."""
    if t is not None and t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} is {t.dtype}; the triton kernels take float16, bfloat16, float32")


def reason(op: str, **tensors: torch.Tensor | None) -> str | None:
    """The first device or dtype reason why ``tensors`` cannot feed ``op``'s kernels."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if r := _common.device_reason(name, t):
            return r
        if t.is_floating_point() and t.dtype not in KERNEL_DTYPES:
            return f"{name} is {t.dtype}; the triton {op} takes float16, bfloat16 or float32"
    return _common.available()


def rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as ``(rows, n)`` with a unit last stride (a copy only when a view cannot be)."""
    t2 = t.reshape(-1, n)
    return t2 if n <= 1 or t2.stride(-1) == 1 else t2.contiguous()


def flat_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two same-shape tensors as ``(rows, n)`` row views with unit last stride.

    Contiguous tensors become a single row of ``numel`` elements (one flat launch); others
    keep their rows (a chunk of a fused projection keeps its row stride, no copy).
    """
    if a.is_contiguous() and b.is_contiguous():
        return a.reshape(1, -1), b.reshape(1, -1)
    n = a.shape[-1] if a.dim() else 1
    return rows(a, n), rows(b, n)


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will ask for a gradient of any of ``tensors``."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    )


def sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of ``t``'s GPU (4 under the interpreter)."""
    return _common.num_sms(_common.device_index(t))
