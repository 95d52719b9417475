import json

import pytest
import torch
from safetensors.torch import load_file

from ryzen_opt.models import ModelConfig, load_checkpoint
from ryzen_opt.models.config import ConfigError
from ryzen_opt.models.train import TrainConfig, main, train

TINY = ModelConfig(
    vocab_size=32, embedding_dim=32, num_heads=2, num_layers=1, ff_dim=64, max_seq_len=16
)


def _cfg(**kw):
    base = dict(
        model=TINY,
        digits=2,
        steps=30,
        batch_size=32,
        warmup_steps=3,
        eval_every=15,
        eval_samples=32,
        seed=5,
    )
    return TrainConfig(**{**base, **kw})


def test_training_is_bit_reproducible_for_a_seed(tmp_path):
    m1 = train(_cfg(), tmp_path / "a", progress=False)
    m2 = train(_cfg(), tmp_path / "b", progress=False)
    w1 = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert m1["val_exact_match"] == m2["val_exact_match"]
    l1 = json.loads((tmp_path / "a" / "loss.json").read_text())["history"]
    l2 = json.loads((tmp_path / "b" / "loss.json").read_text())["history"]
    assert l1 == l2
    m3 = train(_cfg(seed=6), tmp_path / "c", progress=False)
    w3 = load_file(str(tmp_path / "c" / "checkpoint" / "model.safetensors"))
    assert not torch.equal(w1["tok_emb.weight"], w3["tok_emb.weight"])
    assert m3["steps"] == 30


def test_training_lowers_the_loss_and_writes_its_outputs(tmp_path):
    train(_cfg(steps=60, lr=3e-3), tmp_path, progress=False)
    hist = json.loads((tmp_path / "loss.json").read_text())["history"]
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < 0.7 * first
    for name in ("loss.png", "metrics.json", "train_config.yaml"):
        assert (tmp_path / name).is_file()
    assert load_checkpoint(tmp_path / "checkpoint").config == TINY
    assert TrainConfig.from_yaml(tmp_path / "train_config.yaml") == _cfg(steps=60, lr=3e-3)


def test_cli_runs_with_a_yaml_config(tmp_path, capsys):
    _cfg(steps=4, eval_every=4).to_dict()
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_cfg(steps=4, eval_every=4).to_dict()))
    assert (
        main(["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "--no-progress"])
        == 0
    )
    assert "val_exact_match" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(steps=0), "steps"),
        (dict(lr=-1.0), "lr"),
        (dict(warmup_steps=99), "warmup"),
        (dict(digits=9), "max_seq_len"),
        (dict(operators="%"), "operators"),
        (dict(lr=float("nan")), "lr must be finite"),
        (dict(weight_decay=float("nan")), "weight_decay must be finite"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(seed="abc"), "seed"),
        (dict(seed=True), "seed"),
        (dict(warmup_steps=True), "warmup_steps"),
        (dict(device=5), "device"),
        (dict(threads=0), "threads"),
        (dict(model="tiny"), "model must be a ModelConfig"),
    ],
)
def test_bad_train_config_raises_naming_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**kw)


def test_unknown_yaml_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")


def test_default_config_file_matches_the_built_in_defaults():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "train_default.yaml"
    assert TrainConfig.from_yaml(path) == TrainConfig()


def test_optimized_training_follows_the_baseline_loss_curve(tmp_path):
    # Liger-Kernel's fp32 convergence tolerance on the loss at every step
    base = train(_cfg(steps=12, eval_every=12), tmp_path / "a", progress=False)
    opt = main(
        [
            "--out",
            str(tmp_path / "b"),
            "--steps",
            "12",
            "--no-progress",
            "--optimized",
            "--config",
            str(_yaml(tmp_path, _cfg(steps=12, eval_every=12))),
        ]
    )
    assert opt == 0 and not base["optimized"]
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["optimized"] and "optimize_training" in metrics
    assert (tmp_path / "b" / "optimize_training.md").read_text().startswith("# optimize_training")
    la = json.loads((tmp_path / "a" / "loss.json").read_text())["history"]
    lb = json.loads((tmp_path / "b" / "loss.json").read_text())["history"]
    torch.testing.assert_close(
        torch.tensor([h["loss"] for h in lb]),
        torch.tensor([h["loss"] for h in la]),
        atol=1e-8,
        rtol=1e-5,
    )


def _yaml(tmp_path, cfg):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
