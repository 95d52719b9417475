"""The weight-layout contract of the Hugging Face decoder fast paths.

A :class:`DecoderLayout` names every tensor a one-token decode step reads, for the two
decoder shapes served today:

* ``"llama"`` (Llama, Qwen2, Mistral-style): RMSNorm, rotary embeddings, grouped-query
  attention (``kv_heads <= heads``), a SwiGLU MLP ``down(silu(gate(x)) * up(x))``, optional
  biases (Qwen2's q/k/v), tied or untied head;
* ``"gpt2"``: LayerNorm with bias, learned positions, multi-head attention, a GELU-tanh MLP
  ``down(gelu_tanh(up(x)))``, Conv1D weights stored ``(in, out)``.

Every tensor is the model's own parameter or a *view* of it (no copy: the fast path costs no
weight memory). A :class:`Linear` says how to read its weight: ``transposed=False`` is
``nn.Linear``'s ``(out, in)``; ``True`` is GPT-2's Conv1D ``(in, out)``, and GPT-2's fused
``c_attn`` is split into three strided views. Kernels read ``element(n, k)`` at
``n * stride_out + k * stride_in`` (:meth:`Linear.strides`).

:func:`reference_step` is the step in plain PyTorch: the definition every kernel of the
contract is tested against, and itself the body of the ``torch`` CUDA-graph path. Its cache
and position conventions are the contract's:

* ``k_cache``, ``v_cache``: ``(layers, batch, kv_heads, T, head_dim)``, model dtype;
* ``t``: the cache slot written this step (the same for every row), an int64 tensor of shape
  ``(1,)`` on the device (so one CUDA-graph capture serves every step);
* ``start``: ``(batch,)`` int64, the first valid slot of each row (left padding: a row whose
  prompt has ``p`` pad tokens starts at slot ``p``); the row's position id is ``t - start``
  and it attends to slots ``start..t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FAMILIES = ("llama", "gpt2")


@dataclass(frozen=True)
class Linear:
    """``y = x @ W.T + b`` if ``transposed=False`` (``weight`` is ``(out, in)``), else
    ``y = x @ W + b`` (``weight`` is ``(in, out)``). ``weight`` may be a strided view."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transposed: bool = False

    @property
    def out_features(self) -> int:
        return self.weight.shape[1 if self.transposed else 0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[0 if self.transposed else 1]

    def strides(self) -> tuple[int, int]:
        """``(stride_out, stride_in)`` in elements: ``W(n, k)`` is at ``n*so + k*si``."""
        s0, s1 = self.weight.stride()
        return (s1, s0) if self.transposed else (s0, s1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Weights are widened to the activations' dtype (the float32 check of a bf16 model).
        w = self.weight if self.transposed else self.weight.t()
        y = x @ w.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


@dataclass(frozen=True)
class Norm:
    """RMSNorm (``bias is None`` and ``kind == "rms"``) or LayerNorm (``kind == "layer"``)."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        if self.kind == "layer":
            b = None if self.bias is None else self.bias.to(x.dtype)
            return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)
        # HF's Llama/Qwen2 RMSNorm: float32 statistics, weight applied in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)


@dataclass(frozen=True)
class Layer:
    attn_norm: Norm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    mlp_norm: Norm
    gate: Linear | None  # llama: silu(gate(x)) * up(x); gpt2: None
    up: Linear
    down: Linear


@dataclass(frozen=True)
class DecoderLayout:
    """Everything a decode step reads. Build one with ``families.<name>.layout(model)``."""

    family: str  # one of FAMILIES
    vocab: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    max_positions: int
    attn_scale: float  # multiplies q.k
    embed: torch.Tensor  # (vocab, hidden)
    layers: tuple[Layer, ...]
    final_norm: Norm
    head: Linear  # (vocab, hidden): lm_head, or the embedding when tied
    activation: str  # "silu_gate" | "gelu_tanh"
    pos_embed: torch.Tensor | None = None  # (max_positions, hidden), gpt2
    rope_inv_freq: torch.Tensor | None = None  # (head_dim // 2,) float32, llama
    rope_scale: float = 1.0  # HF's attention_scaling: multiplies cos and sin
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def weight_bytes(self) -> int:
        """Bytes of distinct weight storage one decode step reads (a tied head counts once)."""
        seen, total = set(), 0
        tensors = [self.embed, self.final_norm.weight, self.head.weight]
        for lay in self.layers:
            for lin in (lay.q, lay.k, lay.v, lay.o, lay.gate, lay.up, lay.down):
                if lin is not None:
                    tensors += [lin.weight] + ([lin.bias] if lin.bias is not None else [])
            tensors += [lay.attn_norm.weight, lay.mlp_norm.weight]
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        # Only the embedding rows of the step's tokens are read, not the whole table, unless
        # it is also the head.
        if self.head.weight.data_ptr() != self.embed.data_ptr():
            total -= self.embed.numel() * self.embed.element_size()
        return total

    def new_cache(self, batch: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-filled ``(k_cache, v_cache)`` of the contract's shape."""
        shape = (self.num_layers, batch, self.kv_heads, max_len, self.head_dim)
        return (
            torch.zeros(shape, device=self.device, dtype=self.dtype),
            torch.zeros(shape, device=self.device, dtype=self.dtype),
        )


def rope_cos_sin(layout: DecoderLayout, positions: torch.Tensor, dtype: torch.dtype):
    """``cos, sin`` of shape ``(batch, head_dim)`` for int64 ``positions`` ``(batch,)``, as
    HF's rotary embedding computes them (float32 angles, halves repeated, cast to ``dtype``)."""
    freqs = positions.float()[:, None] * layout.rope_inv_freq.float()[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * layout.rope_scale).to(dtype), (emb.sin() * layout.rope_scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``(batch, heads, head_dim)`` rotated: ``x*cos + rotate_half(x)*sin``."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def reference_step(
    layout: DecoderLayout,
    ids: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    t: torch.Tensor,
    start: torch.Tensor,
) -> torch.Tensor:
    """Logits ``(batch, vocab)`` of one token per row; writes slot ``t`` of the caches.
    Graph-safe: no host reads of ``t`` or ``start``. The math runs in the caches' dtype: the
    model's (the fast path), or float32 caches over a bf16/fp16 model's weights, widened op by
    op (the near-exact answer the selection measures both the model and a path against)."""
    lay = layout
    b = ids.shape[0]
    positions = t - start  # (b,)
    x = lay.embed[ids].to(k_cache.dtype)
    if lay.pos_embed is not None:
        x = x + lay.pos_embed[positions].to(x.dtype)
    if lay.rope_inv_freq is not None:
        cos, sin = rope_cos_sin(lay, positions, x.dtype)
    slots = torch.arange(k_cache.shape[3], device=ids.device)
    valid = (slots[None, :] >= start[:, None]) & (slots[None, :] <= t)  # (b, T)
    mask = valid[:, None, None, :]
    group = lay.heads // lay.kv_heads
    for i, layer in enumerate(lay.layers):
        h = layer.attn_norm(x)
        q = layer.q(h).view(b, lay.heads, lay.head_dim)
        k = layer.k(h).view(b, lay.kv_heads, lay.head_dim)
        v = layer.v(h).view(b, lay.kv_heads, lay.head_dim)
        if lay.rope_inv_freq is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache[i].index_copy_(2, t, k[:, :, None, :])
        v_cache[i].index_copy_(2, t, v[:, :, None, :])
        # Grouped-query attention without copying the cache: the ``group`` query heads of
        # one kv head are that head's ``group`` queries (no mask between them).
        qg = q.view(b, lay.kv_heads, group, lay.head_dim)
        y = F.scaled_dot_product_attention(
            qg, k_cache[i], v_cache[i], attn_mask=mask, scale=lay.attn_scale
        )
        x = x + layer.o(y.reshape(b, lay.heads * lay.head_dim))
        h = layer.mlp_norm(x)
        if lay.activation == "silu_gate":
            m = F.silu(layer.gate(h)) * layer.up(h)
        else:
            m = gelu_tanh(layer.up(h))
        x = x + layer.down(m)
    return lay.head(lay.final_norm(x))
