"""bench.edge: OnnxGenerator vs onnxruntime-genai on one exported model, genai optional."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bench.edge as edge
from ryzen_opt.models import ModelConfig, SimpleTransformerModel

TINY = ModelConfig(
    vocab_size=32, embedding_dim=32, num_heads=2, num_layers=2, ff_dim=64, max_seq_len=32
)
ARGS = ["--repeat", "3", "--new-tokens", "6", "--prompt-len", "4", "--batch-sizes", "1,3"]


@pytest.fixture
def tiny(monkeypatch):
    torch.manual_seed(0)
    model = SimpleTransformerModel(TINY).eval()
    monkeypatch.setattr(edge, "load_model", lambda checkpoint, seed: (model, "tiny, seed 0"))
    return model


def test_unused_id_is_the_highest_id_the_tokens_lack():
    assert edge.unused_id(np.array([[31, 30, 5]]), 32) == 29
    assert edge.unused_id(np.array([[0, 1]]), 32) == 31


def test_without_genai_the_bench_times_ours_and_says_genai_is_missing(
    tiny, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(edge, "og", None)
    assert edge.main([*ARGS, "--out", str(tmp_path / "edge")]) == 0
    assert "onnxruntime-genai is not installed" in capsys.readouterr().err
    result = json.loads((tmp_path / "edge.json").read_text())
    assert [c["batch"] for c in result["cells"]] == [1, 3]
    assert all(c["ours_equal_torch"] for c in result["cells"])
    assert all(r[2] == "not installed" for r in result["rows"])
    assert result["env"]["versions"]["onnxruntime_genai"] == "not installed"
    md = (tmp_path / "edge.md").read_text()
    assert "Command: `" in md and f"onnxruntime {result['env']['versions']['onnxruntime']}" in md


def test_genai_runs_our_exported_decoder_with_equal_tokens(tiny, tmp_path):
    pytest.importorskip(
        "onnxruntime_genai", reason="optional (the genai extra); no wheel for Python 3.10"
    )
    assert edge.main([*ARGS, "--out", str(tmp_path / "edge")]) == 0
    result = json.loads((tmp_path / "edge.json").read_text())
    for cell in result["cells"]:
        assert cell["genai_equal_ours"], cell
        assert cell["comparison"]["speedup"] > 0
    assert result["genai_config"]["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_%d"
