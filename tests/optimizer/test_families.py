"""Model families: recognition, refusals with reasons, and the decoder layout contract's
reference step against the model's own forward."""

from __future__ import annotations

import pytest
import torch

from ryzen_opt.optimization import families
from ryzen_opt.optimization.fastpaths.decoder_layout import reference_step
from tests.assertions import TOL, assert_close_rel
from tests.optimizer.hf_models import left_padded, tiny

FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_step_matches_the_model_with_left_padding(family):
    model = tiny(family)
    fam, why = families.find(model)
    assert why is None, why
    lay = fam.layout(model)
    b, p = 3, 7
    ids, mask = left_padded(b, p + 1, [0, 2, 5])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        kc, vc = lay.new_cache(b, 16)
        start = torch.tensor([0, 2, 5])
        for s in range(p + 1):
            out = reference_step(lay, ids[:, s], kc, vc, torch.tensor([s]), start)
    assert_close_rel(out, ref, TOL[torch.float32], f"{family} step logits")


def test_layout_shares_the_model_weights():
    model = tiny("gpt2")
    lay = families.find(model)[0].layout(model)
    w = model.transformer.h[0].attn.c_attn.weight
    assert lay.layers[0].k.weight.data_ptr() == w[:, 64:].data_ptr()
    assert lay.layers[0].k.strides() == (1, 192)
    assert lay.embed.data_ptr() == model.transformer.wte.weight.data_ptr()
    # the tied head counts once
    q = tiny("qwen2")
    qlay = families.find(q)[0].layout(q)
    assert qlay.head.weight.data_ptr() == qlay.embed.data_ptr()
    per_layer = sum(t.numel() for t in q.model.layers.parameters()) * 4
    assert qlay.weight_bytes() == per_layer + q.lm_head.weight.numel() * 4 + 64 * 4


@pytest.mark.parametrize(
    "family, overrides, reason",
    [
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type"),
        ("mistral", {"sliding_window": 16}, "sliding-window"),
        ("gpt2", {"activation_function": "relu"}, "activation_function"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "inverse_layer_idx"),
    ],
)
def test_unsupported_configurations_are_refused_with_the_reason(family, overrides, reason):
    model = tiny(family, **overrides)
    fam, why = families.find(model)
    assert fam is not None and why is not None and reason in why
    with pytest.raises(ValueError, match="model: "):
        fam.layout(model)


def test_other_models_are_not_claimed():
    from ryzen_opt.models.model import SimpleTransformerModel

    fam, why = families.find(SimpleTransformerModel())
    assert fam is None and "not a model family" in why


def test_mixed_dtypes_are_refused():
    model = tiny("llama")
    model.lm_head.to(torch.float64)
    assert "share one of" in families.find(model)[1]
