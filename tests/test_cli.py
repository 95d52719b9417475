"""``ryzen-opt`` CLI: export and compress subcommands, usage errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from ryzen_opt.cli import build_parser, main
from ryzen_opt.compress import OnnxGenerator
from ryzen_opt.models import ModelConfig, SimpleTransformerModel, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, embedding_dim=32, num_heads=2, num_layers=1, ff_dim=64,
                      max_seq_len=32)
    model = SimpleTransformerModel(cfg).eval()
    return model, save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "c")


def test_export_writes_a_checked_decoder(checkpoint, tmp_path, capsys):
    model, ckpt = checkpoint
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    onnx.checker.check_model(str(out), full_check=True)
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        ref = model.generate(ids, 8)
    np.testing.assert_array_equal(OnnxGenerator(out).generate(ids.numpy(), 8), ref.numpy())


def test_compress_writes_a_report(checkpoint, tmp_path):
    _, ckpt = checkpoint
    js = tmp_path / "r.json"
    argv = ["compress", "--checkpoint", str(ckpt), "--methods", "int8_dynamic",
            "--digits", "2", "--eval-samples", "16", "--batch-sizes", "2", "--repeat", "3",
            "--max-accuracy-drop", "100", "--workdir", str(tmp_path / "w"), "--json", str(js)]
    assert main(argv) == 0
    data = json.loads(js.read_text())
    assert [r["method"] for r in data["results"]] == ["fp32", "int8_dynamic"]
    assert data["chosen"] in ("fp32", "int8_dynamic")
    # s8 and u8 weights were both built and timed; u8 replaces the s8 default only when
    # it decodes faster beyond the noise.
    details = data["results"][1]["details"]
    assert details["default_variant"] == "ws8"
    vs = details["variants_vs_default"]["wu8"]
    faster = vs["ci"][0] > 1.0
    assert details["chosen_variant"] == ("wu8" if faster else "ws8")


def test_bad_checkpoint_fails_naming_it(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out",
                 str(tmp_path / "x.onnx")]) == 1
    assert "checkpoint" in capsys.readouterr().err


def test_usage_errors():
    assert main([]) == 2
    with pytest.raises(SystemExit):
        main(["export"])  # --checkpoint and --out are required
    sub = build_parser()._subparsers._group_actions[0].choices
    assert {"export", "compress"} <= set(sub)
