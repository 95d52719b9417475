"""The GPT-2 family (LayerNorm, learned positions, GELU-tanh MLP, Conv1D weights)."""

from __future__ import annotations

import torch.nn as nn

from ryzen_opt.optimization.families import _hf
from ryzen_opt.optimization.fastpaths.decoder_layout import DecoderLayout, Layer, Linear, Norm
from ryzen_opt.optimization.fastpaths.lora import base_of

MODEL_TYPES = ("gpt2",)
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def claims(model: nn.Module) -> bool:
    return _hf.model_type(model) in MODEL_TYPES


def why_not(model: nn.Module) -> str | None:
    reason = _hf.common_refusal(model)
    if reason is not None:
        return reason
    cfg = model.config
    if not hasattr(model, "transformer") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not GPT-2's LM-head model"
    if cfg.activation_function not in ACTIVATIONS:
        return (
            f"activation_function={cfg.activation_function!r}: the fast path implements "
            "the tanh GELU only"
        )
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        return "scale_attn_by_inverse_layer_idx is not implemented"
    if getattr(cfg, "add_cross_attention", False):
        return "cross-attention is not implemented"
    blk = model.transformer.h[0]
    convs = (base_of(blk.attn.c_attn), base_of(blk.mlp.c_fc))
    if any(type(m).__name__ != "Conv1D" for m in convs):
        return "attention/MLP projections are not GPT-2 Conv1D modules"
    return None


def _conv(m: nn.Module, lo: int | None = None, hi: int | None = None) -> Linear:
    m = base_of(m)  # a LoRA layer's base: its merged adapter is in these weights
    w, b = m.weight, m.bias
    if lo is not None:
        w, b = w[:, lo:hi], b[lo:hi]
    return Linear(w, b, transposed=True)


def layout(model: nn.Module) -> DecoderLayout:
    """The model's weights as a :class:`DecoderLayout` (views of its parameters)."""
    reason = why_not(model)
    if reason is not None:
        raise ValueError(f"model: {reason}")
    cfg, tr = model.config, model.transformer
    c, heads = int(cfg.n_embd), int(cfg.n_head)
    eps = float(cfg.layer_norm_epsilon)

    def norm(m):
        return Norm("layer", m.weight, m.bias, float(getattr(m, "eps", eps)))

    layers = tuple(
        Layer(
            attn_norm=norm(blk.ln_1),
            q=_conv(blk.attn.c_attn, 0, c),
            k=_conv(blk.attn.c_attn, c, 2 * c),
            v=_conv(blk.attn.c_attn, 2 * c, 3 * c),
            o=_conv(blk.attn.c_proj),
            mlp_norm=norm(blk.ln_2),
            gate=None,
            up=_conv(blk.mlp.c_fc),
            down=_conv(blk.mlp.c_proj),
        )
        for blk in tr.h
    )
    head_dim = c // heads
    scale = head_dim**-0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
    return DecoderLayout(
        family="gpt2",
        vocab=int(model.lm_head.weight.shape[0]),
        hidden=c,
        heads=heads,
        kv_heads=heads,
        head_dim=head_dim,
        intermediate=int(base_of(tr.h[0].mlp.c_fc).weight.shape[1]),
        max_positions=int(cfg.n_positions),
        attn_scale=float(scale),
        embed=tr.wte.weight,
        layers=layers,
        final_norm=norm(tr.ln_f),
        head=Linear(model.lm_head.weight, None, transposed=False),
        activation="gelu_tanh",
        pos_embed=tr.wpe.weight,
    )
