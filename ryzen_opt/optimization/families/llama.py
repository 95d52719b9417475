"""The Llama family: Llama, Qwen2 and Mistral-style decoders (RMSNorm, rotary embeddings,
grouped-query attention, SwiGLU MLP)."""

from __future__ import annotations

import torch.nn as nn

from ryzen_opt.optimization.families import _hf
from ryzen_opt.optimization.fastpaths.decoder_layout import DecoderLayout, Layer, Linear, Norm
from ryzen_opt.optimization.fastpaths.lora import base_of

MODEL_TYPES = ("llama", "qwen2", "mistral")
# Rope types whose angles HF precomputes once into ``inv_freq`` (and ``attention_scaling``):
# the fast path reads those two and computes the same angles at any position.
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def claims(model: nn.Module) -> bool:
    return _hf.model_type(model) in MODEL_TYPES


def why_not(model: nn.Module) -> str | None:
    reason = _hf.common_refusal(model)
    if reason is not None:
        return reason
    cfg = model.config
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a causal-LM head over a decoder stack"
    act = getattr(cfg, "hidden_act", None)
    if act not in ("silu", "swish"):
        return f"hidden_act={act!r}: the fast path implements SwiGLU with silu only"
    rope = _hf.rope_type(cfg)
    if rope not in ROPE_TYPES:
        return f"rope type {rope!r} is not implemented (implemented: {', '.join(ROPE_TYPES)})"
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    sliding = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", sliding is not None)
    # A window at least the context long never applies (Mistral's default 4096 often is).
    window_applies = sliding is not None and sliding < cfg.max_position_embeddings
    if kinds != {"full_attention"} or (window_applies and uses_window):
        return "sliding-window attention is not implemented"
    if getattr(cfg, "num_local_experts", 0) or getattr(cfg, "num_experts", 0):
        return "mixture-of-experts layers are not implemented"
    rot = getattr(base, "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        return "no rotary embedding module with inv_freq"
    layer0 = base.layers[0]
    for name in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
        if not hasattr(layer0, name):
            return f"decoder layers have no {name}"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(base_of(getattr(layer0.self_attn, name, None)), nn.Linear):
            return f"self_attn.{name} is not an nn.Linear"
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(base_of(getattr(layer0.mlp, name, None)), nn.Linear):
            return f"mlp.{name} is not an nn.Linear"
    return None


def _lin(m: nn.Module) -> Linear:
    m = base_of(m)  # a LoRA layer's base: its merged adapter is in these weights
    return Linear(m.weight, m.bias, transposed=False)


def _norm(m: nn.Module, eps_default: float) -> Norm:
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", eps_default))
    return Norm("rms", m.weight, None, float(eps))


def layout(model: nn.Module) -> DecoderLayout:
    """The model's weights as a :class:`DecoderLayout` (views of its parameters)."""
    reason = why_not(model)
    if reason is not None:
        raise ValueError(f"model: {reason}")
    cfg, base = model.config, model.model
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
    layers = []
    for blk in base.layers:
        a, m = blk.self_attn, blk.mlp
        layers.append(
            Layer(
                attn_norm=_norm(blk.input_layernorm, eps),
                q=_lin(a.q_proj),
                k=_lin(a.k_proj),
                v=_lin(a.v_proj),
                o=_lin(a.o_proj),
                mlp_norm=_norm(blk.post_attention_layernorm, eps),
                gate=_lin(m.gate_proj),
                up=_lin(m.up_proj),
                down=_lin(m.down_proj),
            )
        )
    attn0 = base.layers[0].self_attn
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(attn0, "head_dim", None) or cfg.hidden_size // heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    rot = base.rotary_emb
    return DecoderLayout(
        family="llama",
        vocab=int(model.lm_head.weight.shape[0]),
        hidden=int(cfg.hidden_size),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=int(cfg.intermediate_size),
        max_positions=int(cfg.max_position_embeddings),
        attn_scale=float(getattr(attn0, "scaling", head_dim**-0.5)),
        embed=base.embed_tokens.weight,
        layers=tuple(layers),
        final_norm=_norm(base.norm, eps),
        head=_lin(model.lm_head),
        activation="silu_gate",
        rope_inv_freq=rot.inv_freq,
        rope_scale=float(getattr(rot, "attention_scaling", 1.0)),
    )
