"""LoRA layers: unmerged, merged and mixed-batch forwards agree; the base stays exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ryzen_opt.adapters import (
    AdapterError,
    LoraConfig,
    LoraLinear,
    add_lora,
    delete_adapter,
    lora_bgmv,
    lora_layers,
    merge_adapter,
    mixed_batch,
    remove_lora,
    set_adapter,
    unmerge_adapter,
)
from tests.adapters.conftest import STM_TARGETS, logits, make_stm, randomize
from tests.assertions import TOL, assert_close_rel


class RecordAllocations(TorchDispatchMode):
    """Every tensor any aten op produces inside the block: ``(op, numel, data_ptr)``."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [
            (str(func), t.numel(), t.data_ptr()) for t in tree_flatten(out)[0] if torch.is_tensor(t)
        ]
        return out


def _two_adapters(make, targets):
    model = make()
    add_lora(model, LoraConfig(rank=4, alpha=8, target_modules=targets), "a")
    add_lora(model, LoraConfig(rank=2, alpha=3, target_modules=targets[:2]), "b")
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    return model


def test_lora_config_errors_name_the_argument():
    for kw, word in [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": -1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"target_modules": ()}, "target_modules"),
        ({"target_modules": ("qkv", 3)}, "target_modules"),
        ({"dropout": 1.0}, "dropout"),
    ]:
        with pytest.raises(AdapterError, match=word):
            LoraConfig(**kw)
    cfg = LoraConfig(rank=4, alpha=8, target_modules="qkv")
    assert cfg.scaling == 2.0 and cfg.to_dict()["target_modules"] == ["qkv"]


def test_add_lora_keeps_the_same_frozen_base_parameter_and_changes_nothing_at_init(family):
    make, targets = family
    model = make()
    x = torch.randint(0, 64, (2, 5))
    ref = logits(model, x)
    before = {n: p for n, p in model.named_parameters()}
    cfg = LoraConfig(rank=4, target_modules=targets)
    wanted = [p for p, m in model.named_modules() if cfg.targets(p)]
    add_lora(model, cfg)
    layers = lora_layers(model)
    assert sorted(layers) == sorted(wanted) and len(layers) >= 2 * len(targets)
    for path, layer in layers.items():
        w = layer.base_layer.weight
        assert w is before[f"{path}.weight"] and not w.requires_grad
        assert layer.lora_B["default"].abs().sum() == 0 and layer.lora_A["default"].abs().sum() > 0
    set_adapter(model, "default")
    assert torch.equal(logits(model, x), ref)  # B = 0: PEFT's init changes nothing


def test_merged_equals_unmerged_and_a_float64_reference_in_fp32(family):
    make, targets = family
    model = _two_adapters(make, targets)
    ref_model = _two_adapters(make, targets).double()
    x = torch.randint(0, 64, (3, 7))
    tol = TOL[torch.float32]
    for name in ("a", "b"):
        set_adapter(ref_model, name)
        ref = logits(ref_model, x)
        set_adapter(model, name)
        unmerged = logits(model, x)
        merge_adapter(model, name)
        merged = logits(model, x)
        assert_close_rel(unmerged, ref, tol, f"unmerged {name}")
        assert_close_rel(merged, ref, tol, f"merged {name}")
        assert_close_rel(merged, unmerged, tol, f"merged vs unmerged {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lora_layer_merged_and_unmerged_match_float64_in_each_dtype(dtype):
    # One layer, so the tolerance is the dtype's for one op (a whole bf16 Llama is 2% off
    # its float64 self before any adapter: that error is the model's, not LoRA's).
    torch.manual_seed(0)
    base = nn.Linear(37, 29)
    layer = LoraLinear(base)
    layer.add("a", LoraConfig(rank=5, alpha=7))
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    x = torch.randn(13, 37)
    w = base.weight.double() + 7 / 5 * layer.lora_B["a"].double() @ layer.lora_A["a"].double()
    ref = x.double() @ w.t() + base.bias.double()
    layer = layer.to(dtype)
    layer.active = "a"
    unmerged = layer(x.to(dtype))
    layer.merge("a")
    merged = layer(x.to(dtype))
    assert_close_rel(unmerged, ref, TOL[dtype], f"unmerged {dtype}", reduction=37)
    assert_close_rel(merged, ref, TOL[dtype], f"merged {dtype}", reduction=37)


def test_switching_back_and_forth_restores_the_exact_base_logits(family):
    make, targets = family
    model = _two_adapters(make, targets)
    x = torch.randint(0, 64, (2, 6))
    set_adapter(model, None)
    base = logits(model, x)
    weights = {p: layer.base_layer.weight.clone() for p, layer in lora_layers(model).items()}
    ptrs = {p: layer.base_layer.weight.data_ptr() for p, layer in lora_layers(model).items()}
    outs = {}
    for _ in range(3):
        for name in ("a", "b", "a"):
            merge_adapter(model, name)
            outs.setdefault(("merged", name), logits(model, x))
            assert torch.equal(logits(model, x), outs[("merged", name)])
            set_adapter(model, name)
            assert not torch.equal(logits(model, x), base)
        unmerge_adapter(model)
        set_adapter(model, None)
        assert torch.equal(logits(model, x), base)
    for path, layer in lora_layers(model).items():
        assert torch.equal(layer.base_layer.weight, weights[path]), path
        assert layer.base_layer.weight.data_ptr() == ptrs[path]


def test_unmerged_switch_allocates_nothing():
    model = _two_adapters(make_stm, STM_TARGETS)
    smallest = min(layer.base_layer.weight.numel() for layer in lora_layers(model).values())
    set_adapter(model, "a")
    with RecordAllocations() as rec:
        for name in ("b", "a", None, "b"):
            set_adapter(model, name)
    assert not [m for m in rec.made if m[1] >= smallest], rec.made


@pytest.mark.parametrize("rows", [[0, -1, 1, 0, 1], [-1], [1, 1, 1]])
def test_lora_bgmv_matches_a_float64_reference(rows):
    torch.manual_seed(0)
    n, rank, d_in, d_out = 2, 3, 17, 11
    x = torch.randn(len(rows), d_in)
    a, b = torch.randn(n, rank, d_in), torch.randn(n, d_out, rank)
    scales = torch.tensor([0.5, 2.0])
    idx = torch.tensor(rows)
    out = lora_bgmv(x, a, b, scales, idx)
    ref = torch.zeros(len(rows), d_out, dtype=torch.float64)
    for i, k in enumerate(rows):
        if k >= 0:
            ref[i] = scales[k].double() * (b[k].double() @ (a[k].double() @ x[i].double()))
    assert_close_rel(out, ref, TOL[torch.float32], "lora_bgmv", reduction=d_in)
    assert out[idx < 0].abs().sum() == 0
    empty = lora_bgmv(x[:0], a, b, scales, idx[:0])
    assert empty.shape == (0, d_out)
    for bad in (idx.float(), torch.cat([idx, idx]), torch.full_like(idx, n)):  # dtype, shape, range
        with pytest.raises(ValueError, match="indices"):
            lora_bgmv(x, a, b, scales, bad)


def test_mixed_batch_equals_running_each_row_alone(family):
    make, targets = family
    model = _two_adapters(make, targets)
    x = torch.randint(0, 64, (4, 6))
    rows = ["a", None, "b", "a"]
    with mixed_batch(model, rows):
        mixed = logits(model, x)
    for i, name in enumerate(rows):
        set_adapter(model, name)
        alone = logits(model, x[i : i + 1])
        assert_close_rel(mixed[i : i + 1], alone, TOL[torch.float32], f"row {i} ({name})")
    merge_adapter(model, "a")
    with pytest.raises(AdapterError, match="unmerge"), mixed_batch(model, rows):
        pass


def test_add_lora_errors_name_the_mismatch():
    model = make_stm()
    with pytest.raises(AdapterError, match="match no module"):
        add_lora(model, LoraConfig(target_modules=("q_proj",)))
    with pytest.raises(AdapterError, match="LayerNorm"):
        add_lora(model, LoraConfig(target_modules=("ln1",)))
    add_lora(model, LoraConfig(rank=2))
    with pytest.raises(AdapterError, match="already has"):
        add_lora(model, LoraConfig(rank=2))
    with pytest.raises(AdapterError, match="not in the model"):
        set_adapter(model, "nope")


def test_delete_and_remove_lora_give_back_the_original_modules():
    model = make_stm()
    x = torch.randint(0, 64, (1, 4))
    base = logits(model, x)
    qkv = model.blocks[0].attn.qkv
    add_lora(model, LoraConfig(rank=2), "a")
    randomize(model, "a", seed=3)
    merge_adapter(model, "a")
    delete_adapter(model, "a")  # unmerges first
    assert torch.equal(logits(model, x), base)
    remove_lora(model)
    assert model.blocks[0].attn.qkv is qkv and isinstance(qkv, nn.Linear)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_lora_dropout_applies_in_training_only():
    model = make_stm()
    add_lora(model, LoraConfig(rank=4, dropout=0.5))
    randomize(model, "default", seed=4)
    set_adapter(model, "default")
    x = torch.randint(0, 64, (2, 5))
    eval_out = logits(model, x)
    assert torch.equal(eval_out, logits(model, x))
    model.train()
    assert not torch.equal(logits(model, x), eval_out)


def test_adapter_names_that_shadow_module_methods_work():
    # "copy", "train", "update": names of nn.Module / ParameterDict methods.
    model = make_stm()
    x = torch.randint(0, 64, (1, 4))
    for i, name in enumerate(("copy", "train", "update", "forward")):
        add_lora(model, LoraConfig(rank=2, target_modules=("fc1",)), name)
        randomize(model, name, seed=30 + i)
    outs = {}
    for name in ("copy", "train", "update", "forward"):
        set_adapter(model, name)
        outs[name] = logits(model, x)
    assert len({tuple(o.flatten().tolist()) for o in outs.values()}) == 4
    delete_adapter(model, "copy")
    assert sorted(lora_layers(model)["blocks.0.mlp.fc1"].configs) == ["forward", "train", "update"]
