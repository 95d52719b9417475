"""AdapterRegistry: lazy loading, LRU eviction, switching without copying the base weights,
and generation equal to the model's own with the adapter merged."""

from __future__ import annotations

import pytest
import torch

from ryzen_opt.adapters import (
    AdapterError,
    AdapterRegistry,
    LoraConfig,
    adapter_names,
    add_lora,
    lora_layers,
    merge_adapter,
    save_adapter,
)
from tests.adapters.conftest import fresh_copy, logits, make_stm, randomize
from tests.adapters.test_lora import RecordAllocations


@pytest.fixture
def folders(tmp_path_factory):
    """Three saved adapters of the tiny STM, each with its own targets and rank."""
    out = {}
    for i, targets in enumerate([("qkv", "fc1"), ("proj",), ("qkv", "proj", "fc1", "fc2")]):
        m = add_lora(make_stm(), LoraConfig(rank=2 + i, alpha=4, target_modules=targets))
        randomize(m, "default", seed=10 + i, std=0.5)
        out[f"ad{i}"] = save_adapter(m, tmp_path_factory.mktemp(f"ad{i}"))
    return out


def _registry(folders, **kw) -> AdapterRegistry:
    reg = AdapterRegistry(make_stm(), **kw)
    for name, folder in folders.items():
        reg.register(name, folder)
    return reg


def _merged_reference(folder, prompt, **kw):
    from ryzen_opt.adapters import load_adapter

    model = load_adapter(make_stm(), folder, "x")
    merge_adapter(model, "x")
    return model.generate(prompt, **kw)


def test_register_loads_nothing_until_used_and_lru_evicts_the_oldest(folders):
    reg = _registry(folders, max_resident=2)
    assert reg.resident == [] and adapter_names(reg.model) == []
    reg.activate("ad0")
    reg.activate("ad1")
    assert reg.resident == ["ad0", "ad1"]
    reg.activate("ad0")  # now ad1 is the least recently used
    reg.activate("ad2")
    assert reg.resident == ["ad0", "ad2"] and sorted(adapter_names(reg.model)) == ["ad0", "ad2"]
    reg.load("ad1")  # evicts ad0; the active ad2 stays
    assert reg.resident == ["ad2", "ad1"] and reg.active == "ad2"
    with pytest.raises(AdapterError, match="not registered"):
        reg.activate("nope")
    with pytest.raises(AdapterError, match="max_resident"):
        AdapterRegistry(make_stm(), max_resident=0)


def test_evicting_the_active_adapter_restores_the_base_model(folders):
    reg = _registry(folders, max_resident=1, merged=True)
    x = torch.randint(0, 64, (1, 5))
    base = logits(reg.model, x)
    reg.activate("ad0")
    reg.load("ad1")
    assert reg.active is None and reg.resident == ["ad1"]
    assert torch.equal(logits(reg.model, x), base)


@pytest.mark.parametrize("merged", [False, True])
def test_generate_equals_the_models_generate_with_the_adapter_merged(folders, merged):
    reg = _registry(folders, max_resident=2, merged=merged)
    prompt = torch.randint(0, 64, (2, 4))
    kw = {"max_new_tokens": 6}
    for name in ("ad0", "ad2", "ad1", "ad0"):
        out = reg.generate(prompt, adapter=name, **kw)
        assert torch.equal(out, _merged_reference(folders[name], prompt, **kw)), name
        streamed = torch.stack(list(reg.generate_stream(prompt, adapter=name, **kw)), dim=1)
        assert torch.equal(streamed, out[:, prompt.shape[1] :])
    assert torch.equal(reg.generate(prompt, adapter=None, **kw), make_stm().generate(prompt, **kw))


def test_a_mixed_batch_generates_what_each_row_generates_alone(folders):
    reg = _registry(folders, max_resident=3)
    prompt = torch.randint(0, 64, (4, 5))
    rows = ["ad0", None, "ad2", "ad0"]
    out = reg.generate(prompt, adapter=rows, max_new_tokens=5)
    for i, name in enumerate(rows):
        alone = reg.generate(prompt[i : i + 1], adapter=name, max_new_tokens=5)
        assert torch.equal(out[i : i + 1], alone), (i, name)
    merged = _registry(folders, merged=True)
    with pytest.raises(AdapterError, match="merged=False"):
        merged.generate(prompt, adapter=rows, max_new_tokens=2)


@pytest.mark.parametrize("merged", [False, True])
def test_switching_never_moves_or_copies_the_base_weights(folders, merged):
    reg = _registry(folders, max_resident=3, merged=merged)
    for name in folders:
        reg.load(name)
    layers = lora_layers(reg.model)
    ptrs = {
        p: (layer.base_layer.weight, layer.base_layer.weight.data_ptr())
        for p, layer in layers.items()
    }
    smallest = min(layer.base_layer.weight.numel() for layer in layers.values())
    reg.activate("ad0")
    with RecordAllocations() as rec:
        for name in ("ad1", "ad2", "ad0", "ad2"):
            reg.activate(name)
        reg.deactivate()
    for path, layer in lora_layers(reg.model).items():
        assert layer.base_layer.weight is ptrs[path][0]
        assert layer.base_layer.weight.data_ptr() == ptrs[path][1]
    big = [m for m in rec.made if m[1] >= smallest]
    if merged:
        # Merging writes base-size results, each into a base weight or its saved copy.
        in_place = {p for _, p in ptrs.values()}
        in_place |= {layer._backup.data_ptr() for layer in layers.values()}
        assert big and all(m[2] in in_place for m in big), big
    else:
        assert not big, big


def test_a_failed_load_keeps_the_active_adapter(folders, tmp_path):
    reg = _registry(folders, max_resident=2)
    (tmp_path / "adapter_config.json").write_text("{}")
    reg.register("broken", tmp_path)
    reg.activate("ad0")
    x = torch.randint(0, 64, (1, 4))
    before = logits(reg.model, x)
    with pytest.raises(AdapterError, match="peft_type"):
        reg.activate("broken")
    assert reg.active == "ad0" and reg.resident == ["ad0"]
    assert torch.equal(logits(reg.model, x), before)


def test_switching_while_a_stream_is_open_is_refused(folders):
    reg = _registry(folders)
    stream = reg.generate_stream(torch.tensor([[1, 2, 3]]), adapter="ad0", max_new_tokens=4)
    next(stream)
    with pytest.raises(AdapterError, match="generate_stream"):
        reg.activate("ad1")
    stream.close()
    reg.activate("ad1")
    assert reg.active == "ad1"


def test_registry_serves_an_hf_llama_with_its_own_generate(tmp_path):
    from tests.adapters.conftest import make_llama

    src = add_lora(make_llama(), LoraConfig(rank=4, target_modules=("q_proj", "v_proj")))
    randomize(src, "default", seed=20, std=0.5)
    save_adapter(src, tmp_path)
    base = make_llama()
    reference = fresh_copy(base)
    from ryzen_opt.adapters import load_adapter

    load_adapter(reference, tmp_path, "x")
    merge_adapter(reference, "x")
    reg = AdapterRegistry(base)
    reg.register("l", tmp_path)
    prompt = torch.randint(0, 64, (2, 5))
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    out = reg.generate(prompt, adapter="l", **kw)
    assert torch.equal(out, reference.generate(prompt, **kw))
    streamed = torch.stack(list(reg.generate_stream(prompt, adapter="l", **kw)), dim=1)
    assert torch.equal(streamed, out[:, prompt.shape[1] :])


def test_a_mixed_batch_on_an_hf_llama_matches_each_row_alone(tmp_path):
    from tests.adapters.conftest import make_llama

    src = add_lora(make_llama(), LoraConfig(rank=4, target_modules=("q_proj", "up_proj")))
    randomize(src, "default", seed=21, std=0.5)
    save_adapter(src, tmp_path)
    reg = AdapterRegistry(make_llama())
    reg.register("l", tmp_path)
    prompt = torch.randint(0, 64, (3, 5))
    # min_new_tokens: no row stops early at Llama's eos (id 2), so rows compare whole.
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    rows = ["l", None, "l"]
    out = reg.generate(prompt, adapter=rows, **kw)
    for i, name in enumerate(rows):
        assert torch.equal(out[i : i + 1], reg.generate(prompt[i : i + 1], adapter=name, **kw))


def test_a_model_without_generate_is_named():
    reg = AdapterRegistry(torch.nn.Linear(2, 2))
    with pytest.raises(AdapterError, match="no generate"):
        reg.generate(torch.zeros(1, 2))
