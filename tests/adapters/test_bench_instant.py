"""bench.instant_adapters in a tiny quick run: every method and table, on random checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from bench import instant_adapters as bi
from ryzen_opt.adapters import LoraConfig, SVFExperts, TextToLoRA, add_lora, save_adapter
from ryzen_opt.adapters.instant import classifier_data
from ryzen_opt.adapters.tasks import SEEN
from ryzen_opt.models import save_checkpoint
from tests.adapters.conftest import make_stm, randomize


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: on a shared 2-core machine two OpenMP threads stall at every barrier
    (measured: the reconstruction test took 138 s with 2 threads under load, 8 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def inputs(tmp_path):
    save_checkpoint(make_stm(), tmp_path / "ckpt")
    for i, s in enumerate(SEEN):
        m = add_lora(make_stm(), LoraConfig(rank=4))
        randomize(m, "default", seed=i, std=0.3)
        save_adapter(m, tmp_path / "lib" / s.name)
    for name in ("recon", "sft"):
        net = TextToLoRA.for_model(make_stm(), LoraConfig(rank=4), encoder_dim=64, hidden=16)
        net.save(tmp_path / name)
    base = make_stm()
    svf = SVFExperts(base)
    g = torch.Generator().manual_seed(0)
    for s in SEEN:
        svf.add_expert(
            s.name, {p: 1 + 0.1 * torch.randn(n, generator=g) for p, n in svf.sizes().items()}
        )
    svf.fit_classifier(*classifier_data(svf, base, "train", 8), steps=20)
    svf.save(tmp_path / "svf")
    return tmp_path


def test_quick_run_writes_every_method_table_and_plot(inputs):
    out = inputs / "instant.json"
    argv = ["--checkpoint", str(inputs / "ckpt"), "--library", str(inputs / "lib")]
    argv += ["--t2l-recon", str(inputs / "recon"), "--t2l-sft", str(inputs / "sft")]
    argv += ["--svf", str(inputs / "svf"), "--tasks", "add2,sub2_rev", "--eval-samples", "4"]
    argv += ["--repeat", "3", "--new-tokens", "4", "--optimize-budget", "5", "-o", str(out)]
    assert bi.main(argv) == 0
    data = json.loads(out.read_text())
    assert list(data["accuracy"]) == ["add2", "sub2_rev"]
    seen, held = data["accuracy"]["add2"], data["accuracy"]["sub2_rev"]
    assert all(seen[m] is not None for m in bi.METHODS)
    for m in ("LoRA (trained)", "T2L recon, train desc", "SVF oracle"):
        assert held[m] is None, m  # no trained adapter, no training paraphrase, no expert
    assert 0 <= data["skill_identification"]["mean"] <= 1
    assert data["parameters"]["SVF expert"] < data["parameters"]["LoRA (trained)"]
    assert all(t["median"] > 0 for t in data["generation"].values())
    assert set(data["decode"]) == {
        "base",
        "LoRA (trained), merged",
        "T2L SFT, merged",
        "SVF expert, in place",
    }
    assert all(v["same_ids_as_eager"] for v in data["decode"].values())
    assert data["two_pass"]["ratio"] > 0
    goals = data["goals"]
    svf = goals["seen"]["add2"]["SVF oracle"]
    lora = seen["LoRA (trained)"]
    assert svf["of_lora"] == (None if lora == 0 else pytest.approx(seen["SVF oracle"] / lora))
    assert set(goals["held_out"]["sub2_rev"]) == {"T2L recon, held-out desc",
                                                  "T2L SFT, held-out desc"}  # fmt: skip
    diff = goals["held_out"]["sub2_rev"]["T2L SFT, held-out desc"]["minus_nearest"]
    assert diff == pytest.approx(held["T2L SFT, held-out desc"] - held["nearest library LoRA"])
    assert 0 < goals["svf_parameters_of_lora"] < 1
    assert out.with_suffix(".png").stat().st_size > 0
    assert out.with_suffix(".md").read_text().startswith("# bench.instant_adapters")


@pytest.mark.parametrize(
    "args, name",
    [
        (["--repeat", "2"], "--repeat"),
        (["--eval-samples", "0"], "--eval-samples"),
        (["--tasks", "nope"], "--tasks"),
    ],
)
def test_bad_arguments_name_the_argument(args, name, capsys):
    with pytest.raises(SystemExit):
        bi.main(args)
    assert name in capsys.readouterr().err
