"""train_adapter: only the adapter learns; the base weights come out bit-identical."""

from __future__ import annotations

import json

import pytest
import torch

from ryzen_opt.adapters import (
    AdapterError,
    AdapterTrainConfig,
    LoraConfig,
    load_adapter,
    lora_parameters,
    train_adapter,
)
from ryzen_opt.adapters.train import main
from ryzen_opt.models import save_checkpoint
from tests.adapters.conftest import make_stm

FAST = {"steps": 40, "batch_size": 16, "warmup_steps": 4, "eval_samples": 8, "lr": 1e-2}


def test_training_changes_only_the_adapter_and_lowers_the_loss():
    model = make_stm()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    out = train_adapter(model, LoraConfig(rank=4, alpha=8), AdapterTrainConfig(**FAST))
    for n, p in model.named_parameters():
        key = n.replace(".base_layer", "")
        if "lora_" in n:
            continue
        assert torch.equal(p, base[key]), f"{n} changed"
        # add_lora freezes the wrapped layers (PEFT does too); training restores the rest
        frozen = ".base_layer." in n
        assert p.requires_grad == (grads[key] and not frozen), f"{n} requires_grad"
    b = [p for p in lora_parameters(model, "default") if p.shape[1] == 4]
    assert b and all(p.abs().sum() > 0 for p in b)  # B left zero: nothing was learned
    losses = out["losses"]
    assert len(losses) == FAST["steps"]
    # The loss falls (by 0.2 nats here: a random base learns slowly through rank 4 alone).
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert not model.training


def test_training_is_reproducible_for_a_seed():
    runs = []
    for _ in range(2):
        model = make_stm()
        cfg = AdapterTrainConfig(**{**FAST, "steps": 3, "warmup_steps": 1})
        runs.append(train_adapter(model, LoraConfig(rank=2), cfg)["losses"])
    assert runs[0] == runs[1]


def test_adapter_train_config_errors_name_the_argument():
    for kw, word in [
        ({"steps": 0}, "steps"),
        ({"lr": 0}, "lr"),
        ({"warmup_steps": 5, "steps": 2}, "warmup_steps"),
        ({"operators": "/"}, "operators"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(AdapterError, match=word):
            AdapterTrainConfig(**kw)


def test_the_command_line_reports_accuracy_and_saves_a_loadable_adapter(tmp_path, capsys):
    save_checkpoint(make_stm(), tmp_path / "ckpt")
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ad")]
    argv += ["--steps", "2", "--eval-samples", "4", "--rank", "2"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "ad" / "metrics.json").read_text())
    assert 0 <= metrics["test_exact_match_before"] <= 1
    assert 0 <= metrics["test_exact_match_after"] <= 1
    assert "test_exact_match_after" in capsys.readouterr().out
    load_adapter(make_stm(), tmp_path / "ad")


def test_an_hf_llama_trains_through_the_same_function():
    from tests.adapters.conftest import LLAMA_TARGETS, make_llama

    model = make_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = AdapterTrainConfig(**{**FAST, "steps": 5, "warmup_steps": 1})
    out = train_adapter(model, LoraConfig(rank=2, target_modules=LLAMA_TARGETS), cfg)
    assert len(out["losses"]) == 5 and out["trainable_parameters"] > 0
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n


@pytest.mark.parametrize("args, word", [(["--rank", "0"], "rank"), (["--steps", "0"], "steps")])
def test_the_command_line_names_a_bad_option(tmp_path, capsys, args, word):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "ad"), *args])
    assert e.value.code == 2 and word in capsys.readouterr().err
