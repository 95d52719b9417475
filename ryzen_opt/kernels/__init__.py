"""Public ops. Each takes ``backend=`` ("auto", "reference", "numba", "triton", ...).

Example:
    >>> import torch
    >>> from ryzen_opt.kernels import matmul
    >>> a, b = torch.randn(4, 8), torch.randn(8, 3)
    >>> matmul(a, b, activation="gelu").shape
    torch.Size([4, 3])
"""

from __future__ import annotations

import torch

from ryzen_opt.kernels.registry import BackendError, backends, dispatch

__all__ = [
    "BackendError",
    "attention",
    "backends",
    "decode_attention",
    "layer_norm",
    "lora_bgmv",
    "matmul",
]


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``activation(a @ b + bias) + residual`` (see :func:`reference.matmul`)."""
    return dispatch("matmul", backend, a, b, bias, activation, residual, out_dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention in SDPA layout (see :func:`reference.attention`)."""
    return dispatch("attention", backend, q, k, v, causal, scale, attn_mask)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lengths: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One query token per row against a KV cache (see :func:`reference.decode_attention`)."""
    return dispatch("decode_attention", backend, q, k_cache, v_cache, cache_lengths, scale)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm with an optional fused residual add (see :func:`reference.layer_norm`)."""
    return dispatch("layer_norm", backend, x, weight, bias, eps, residual)


def lora_bgmv(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mixed-batch LoRA delta: row ``r`` uses adapter ``indices[r]`` (-1: none); with ``out``
    the delta is added into it in place (see :func:`reference.lora_bgmv`)."""
    return dispatch("lora_bgmv", backend, x, a, b, scales, indices, out=out)
