"""PEFT-format adapters: ours load in ``peft`` and ``peft``'s load here, with equal logits;
every mismatch and broken file raises naming it and leaves the model as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ryzen_opt.adapters import (
    AdapterError,
    LoraConfig,
    adapter_names,
    add_lora,
    load_adapter,
    save_adapter,
    set_adapter,
)
from ryzen_opt.models import ModelConfig, SimpleTransformerModel
from tests.adapters.conftest import STM_CONFIG, fresh_copy, logits, make_stm, randomize
from tests.assertions import TOL, assert_close_rel

peft = pytest.importorskip("peft")


def test_an_adapter_saved_here_loads_in_peft_with_the_same_logits(family, tmp_path):
    make, targets = family
    base = make()
    model = add_lora(fresh_copy(base), LoraConfig(rank=4, alpha=8, target_modules=targets))
    randomize(model, "default", seed=5)
    set_adapter(model, "default")
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    x = torch.randint(0, 64, (2, 9))
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    ours = logits(model, x)
    assert not torch.equal(ours, logits(make(), x))  # the adapter does change the logits
    assert_close_rel(ours, logits(theirs, x), TOL[torch.float32], "ours -> peft")


def test_an_adapter_made_by_peft_loads_here_with_the_same_logits(family, tmp_path):
    make, targets = family
    base = make()
    conv1d = make.__name__ == "make_gpt2"  # PEFT's flag for GPT-2's (in, out) weights
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=list(targets[:3]),
        lora_dropout=0.1,
        fan_in_fan_out=conv1d,
    )
    theirs = peft.get_peft_model(fresh_copy(base), cfg)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)  # PEFT's B starts at zero; a zero B would prove nothing
    theirs.save_pretrained(str(tmp_path))
    theirs.eval()
    model = load_adapter(fresh_copy(base), tmp_path, name="peft")
    set_adapter(model, "peft")
    x = torch.randint(0, 64, (3, 8))
    ours = logits(model, x)
    assert not torch.equal(ours, logits(base, x))
    assert_close_rel(ours, logits(theirs, x), TOL[torch.float32], "peft -> ours")


def test_save_then_load_round_trips_bit_for_bit(tmp_path):
    model = add_lora(make_stm(), LoraConfig(rank=3, alpha=5, target_modules=("qkv", "fc2")))
    randomize(model, "default", seed=6)
    save_adapter(model, tmp_path)
    again = load_adapter(make_stm(), tmp_path, name="x")
    x = torch.randint(0, 64, (2, 5))
    set_adapter(model, "default")
    set_adapter(again, "x")
    assert torch.equal(logits(model, x), logits(again, x))


@pytest.fixture
def saved(tmp_path):
    """A saved STM adapter and a model that holds a different adapter, active."""
    src = add_lora(make_stm(), LoraConfig(rank=4, alpha=8, target_modules=("qkv", "fc1")))
    randomize(src, "default", seed=7)
    folder = tmp_path / "adapter"
    save_adapter(src, folder)
    target = add_lora(make_stm(), LoraConfig(rank=2, target_modules=("proj",)), "live")
    randomize(target, "live", seed=8)
    set_adapter(target, "live")
    return folder, target


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_weights(folder, fn):
    path = folder / "adapter_model.safetensors"
    state = load_file(str(path))
    save_file(fn(state), str(path))


BROKEN = {
    "rank": (lambda f: _edit_config(f, r=8), "rank mismatch"),
    "targets_missing": (lambda f: _edit_config(f, target_modules=["q_proj"]), "match no module"),
    "targets_extra": (
        lambda f: _edit_config(f, target_modules=["qkv", "fc1", "fc2"]),
        "lack base_model.model.blocks.0.mlp.fc2",
    ),
    "tensors_extra": (
        lambda f: _edit_config(f, target_modules=["qkv"]),
        "does not target",
    ),
    "no_config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json.*missing"),
    "no_weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "weights.*missing"),
    "bad_json": (lambda f: (f / "adapter_config.json").write_text("{r: 4"), "not valid JSON"),
    "bad_weights": (
        lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x10\x00" * 9),
        "corrupt",
    ),
    "truncated_weights": (
        lambda f: (f / "adapter_model.safetensors").write_bytes(
            (f / "adapter_model.safetensors").read_bytes()[:-100]
        ),
        "corrupt",
    ),
    "dora": (lambda f: _edit_config(f, use_dora=True), "use_dora"),
    "regex": (lambda f: _edit_config(f, target_modules=".*qkv"), "regex"),
    "not_lora": (lambda f: _edit_config(f, peft_type="IA3"), "peft_type"),
    "wrong_dtype": (
        lambda f: _edit_weights(f, lambda s: {k: v.to(torch.int32) for k, v in s.items()}),
        "torch.int32",
    ),
    "no_folder": (lambda f: [p.unlink() for p in f.iterdir()] and f.rmdir(), "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_or_mismatched_adapter_raises_and_leaves_the_model_unchanged(saved, case):
    folder, model = saved
    breaker, message = BROKEN[case]
    x = torch.randint(0, 64, (2, 5))
    before = logits(model, x)
    breaker(folder)
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, folder, name="new")
    assert adapter_names(model) == ["live"]
    assert torch.equal(logits(model, x), before)


def test_an_adapter_of_another_base_shape_is_refused(tmp_path):
    wide = ModelConfig(**{**STM_CONFIG.to_dict(), "embedding_dim": 48, "ff_dim": 48})
    src = add_lora(SimpleTransformerModel(wide), LoraConfig(rank=2, target_modules=("qkv",)))
    save_adapter(src, tmp_path)
    with pytest.raises(AdapterError, match="base-model shape mismatch.*blocks.0.attn.qkv"):
        load_adapter(make_stm(), tmp_path)


def test_loading_under_a_taken_name_is_refused(saved):
    folder, model = saved
    with pytest.raises(AdapterError, match="already has"):
        load_adapter(model, folder, name="live")
