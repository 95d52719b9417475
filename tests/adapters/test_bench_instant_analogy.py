"""bench.instant_analogy: the weight arithmetic equals merging the adapters one by one, and a
quick run over random checkpoints writes its tables."""

from __future__ import annotations

import json

import pytest
import torch

from bench import instant_adapters as bi
from bench import instant_analogy as ba
from ryzen_opt.adapters import LoraConfig, add_lora, save_adapter
from ryzen_opt.adapters.tasks import SEEN
from ryzen_opt.models import save_checkpoint
from tests.adapters.conftest import make_stm, randomize


@pytest.fixture
def library(tmp_path):
    save_checkpoint(make_stm(), tmp_path / "ckpt")
    for i, s in enumerate(SEEN):
        m = add_lora(make_stm(), LoraConfig(rank=4))
        randomize(m, "default", seed=i, std=0.3)
        save_adapter(m, tmp_path / "lib" / s.name)
    return tmp_path


def _weights(model):
    """State dict keyed like the plain model's (a merged LoRA layer's weight sits in its
    ``base_layer``; its A/B factors are left out)."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.clone()
    return out


def test_sum_of_deltas_equals_merging_each_adapter(library):
    base = make_stm()
    deltas = ba.lora_deltas(library / "lib")
    # zero weights: the base itself
    same = _weights(ba.merged_model(base, deltas, {"sub2": 0.0}))
    for k, v in _weights(base).items():
        assert torch.equal(same[k], v), k
    # +1 sub2 +1 add2_rev: the base plus each merged adapter's own change
    got = _weights(ba.merged_model(base, deltas, {"sub2": 1.0, "add2_rev": 1.0}))
    ref = _weights(base)
    for name in ("sub2", "add2_rev"):
        merged = _weights(bi._merged(base, library / "lib" / name))
        for k in ref:
            ref[k] = ref[k] + (merged[k] - _weights(base)[k])
    changed = 0
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(got[k], _weights(base)[k])
    assert changed > 0  # the LoRAs did touch the weights


def test_quick_run_writes_json_and_markdown(library, tmp_path):
    out = tmp_path / "res" / "analogy.json"
    argv = ["--checkpoint", str(library / "ckpt"), "--library", str(library / "lib"),
            "-n", "4", "-o", str(out)]  # fmt: skip
    assert ba.main(argv) == 0
    data = json.loads(out.read_text())
    labels = {(r["task"], r["combination"]) for r in data["rows"]}
    assert ("sub2_rev", "analogy") in labels and ("sub3_rev", "base") in labels
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in data["rows"])
    assert "| sub2_rev | analogy |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(
    "argv,msg",
    [(["-n", "0"], "argument -n"), (["--library", "/nonexistent"], "argument --library")],
)
def test_bad_arguments_name_the_argument(argv, msg, capsys):
    with pytest.raises(SystemExit):
        ba.main(argv)
    assert msg in capsys.readouterr().err
