"""The causal self-attention of ``SimpleTransformerModel``, written once.

Every module that computes the baseline's attention calls :func:`causal_self_attention`:
the model's own :class:`~ryzen_opt.models.model.CausalSelfAttention`, ``optimize()``'s
``OptimizedSelfAttention`` (which hands the core to a measured backend), the pruned
attention of :mod:`ryzen_opt.compress.prune` (fewer heads than the model width) and the
ONNX export wrapper (:mod:`ryzen_opt.compress.export`, explicit matmul/softmax ops). They
differ only in the *core*, ``(q, k, v, dropout_p) -> y`` on ``(batch, heads, seq,
head_dim)`` tensors; the qkv split, the heads reshape, the KV-cache concat and the merge are
the same code.

The cache is a ``(k, v)`` pair of ``(batch, heads, past_len, head_dim)`` tensors; a call
returns the new pair with its keys and values appended (query ``i`` of a chunk sees keys up
to ``past_len + i``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def attention_case(q_len: int, past_len: int) -> str | None:
    """``"prefill"`` (no cache), ``"decode"`` (one token after a cache), else ``None`` (a
    chunk of several tokens after a cache)."""
    if past_len == 0:
        return "prefill"
    return "decode" if q_len == 1 else None


def qkv_heads(attn: nn.Module, x: torch.Tensor, past=None) -> tuple[torch.Tensor, ...]:
    """``q, k, v`` as ``(batch, heads, seq, head_dim)``, the cache ``past`` prepended to k/v.

    ``attn`` has ``qkv`` (a Linear to ``3 * heads * head_dim``), ``num_heads`` and
    ``head_dim``. ``reshape`` is a view here (the qkv output splits along its last dim), so
    the result is what ``view`` gives, and the ONNX exporter takes it as well.
    """
    b, t, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).split(h * d, dim=2)
    q = q.reshape(b, t, h, d).transpose(1, 2)
    k = k.reshape(b, t, h, d).transpose(1, 2)
    v = v.reshape(b, t, h, d).transpose(1, 2)
    if past is not None:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    return q, k, v


def sdpa_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0):
    """The baseline's core: PyTorch SDPA, causal for a prefill, unmasked for a one-token
    decode step, an explicit mask for a chunk after a cache."""
    t, past_len = q.shape[2], k.shape[2] - q.shape[2]
    case = attention_case(t, past_len)
    if case == "prefill":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=t > 1)
    if case == "decode":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # A chunk after a cache: query i sees keys up to past_len + i.
    i = torch.arange(t, device=q.device)[:, None]
    j = torch.arange(k.shape[2], device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i + past_len, dropout_p=dropout_p)


def explicit_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0):
    """The same attention as plain matmul, mask and softmax ops (what the ONNX export
    traces: one graph serves prefill, decode and chunks). Inference only: no dropout."""
    if dropout_p:
        raise ValueError(f"explicit_core has no dropout, got dropout_p={dropout_p}")
    t, total = q.shape[2], k.shape[2]
    # Query i (absolute position past + i) sees keys 0..past + i.
    qi = torch.arange(t, device=q.device)[:, None] + (total - t)
    kj = torch.arange(total, device=q.device)[None, :]
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(kj > qi, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def causal_self_attention(
    attn: nn.Module,
    x: torch.Tensor,
    past=None,
    *,
    core: Core = sdpa_core,
    dropout_p: float | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``(proj(attention(x)), (k, v))``: the baseline's attention step over ``attn``'s weights.

    Args:
        attn: a module with ``qkv``, ``proj``, ``num_heads``, ``head_dim`` and ``dropout``.
        x: ``(batch, seq, embedding_dim)`` input.
        past: ``None`` or the ``(k, v)`` cache of earlier positions.
        core: the attention on ``(q, k, v, dropout_p)``; :func:`sdpa_core` by default.
        dropout_p: the attention dropout; ``None`` takes ``attn.dropout`` in training mode,
            0 in eval mode.

    Returns:
        The projected output ``(batch, seq, embedding_dim)`` and the cache with ``x``'s
        keys and values appended.
    """
    b, t, _ = x.shape
    q, k, v = qkv_heads(attn, x, past)
    if dropout_p is None:
        dropout_p = attn.dropout if attn.training else 0.0
    y = core(q, k, v, dropout_p)
    y = y.transpose(1, 2).reshape(b, t, attn.num_heads * attn.head_dim)
    return attn.proj(y), (k, v)
