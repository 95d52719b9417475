"""``ryzen-opt`` CLI: export and compress subcommands, usage errors."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

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
    cfg = ModelConfig(
        vocab_size=32, embedding_dim=32, num_heads=2, num_layers=1, ff_dim=64, max_seq_len=32
    )
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


def _compress_argv(ckpt, *extra):
    return [
        "compress",
        "--checkpoint",
        str(ckpt),
        "--methods",
        "int8_dynamic",
        "--digits",
        "2",
        "--eval-samples",
        "16",
        "--batch-sizes",
        "2",
        "--repeat",
        "3",
        *extra,
    ]


def test_compress_writes_a_report(checkpoint, tmp_path):
    _, ckpt = checkpoint
    js = tmp_path / "r.json"
    argv = _compress_argv(
        ckpt,
        "--max-accuracy-drop",
        "100",
        "--workdir",
        str(tmp_path / "w"),
        "--json",
        str(js),
        "--out",
        str(tmp_path / "best.onnx"),
    )
    assert main(argv) == 0
    data = json.loads(js.read_text())
    assert [r["method"] for r in data["results"]] == ["fp32", "int8_dynamic"]
    assert data["chosen"] in ("fp32", "int8_dynamic")
    details = data["results"][1]["details"]
    assert details["default_variant"] == "ws8"
    vs = details["variants_vs_default"]
    if vs:
        # The opening fp32-vs-fp32 check passed, so s8 and u8 weights were both timed; u8
        # replaces the s8 default only when it decodes faster beyond the noise.
        faster = vs["wu8"]["ci"][0] > 1.0
        assert details["chosen_variant"] == ("wu8" if faster else "ws8")
    else:  # 3 samples on a busy machine: that check said noise, so no race on noise
        assert not data["speed_trusted"]
        assert details["chosen_variant"] == "ws8" and "noise" in details["note"]
    # --workdir keeps every artifact; the chosen one was also written to --out.
    assert all(Path(r["path"]).is_file() for r in data["results"] if r["method"] != data["chosen"])
    chosen = next(r for r in data["results"] if r["method"] == data["chosen"])
    assert chosen["path"] == str(tmp_path / "best.onnx")


def test_compress_writes_the_chosen_artifact_to_the_working_directory(
    checkpoint, tmp_path, monkeypatch, capsys
):
    _, ckpt = checkpoint
    work, systmp = tmp_path / "cwd", tmp_path / "systmp"
    work.mkdir()
    systmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    js = tmp_path / "r.json"
    assert main(_compress_argv(ckpt, "--max-accuracy-drop", "100", "--json", str(js))) == 0
    out = work / "compressed.onnx"
    data = json.loads(js.read_text())
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["ryzen_opt.method"] == data["chosen"]
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in work.iterdir()) == ["compressed.onnx"]
    assert list(systmp.iterdir()) == []  # the temporary workdir is gone
    assert all(r["path"] is None for r in data["results"] if r["method"] != data["chosen"])
    # A second run refuses to overwrite it, before doing any work, unless --force.
    before = out.read_bytes()
    assert main(_compress_argv(ckpt, "--max-accuracy-drop", "100")) == 2
    assert "already exists (--force overwrites it)" in capsys.readouterr().err
    assert out.read_bytes() == before


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    for n in needles:
        assert n in last, err
    return last


def test_export_to_a_folder_or_an_empty_path_is_a_usage_error(checkpoint, tmp_path, capsys):
    _, ckpt = checkpoint
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path)]) == 2
    assert _one_line_error(capsys, "--out", "is a folder") == (
        f"ryzen-opt export: error: --out {str(tmp_path)!r} is a folder; give a file path "
        f"such as {str(tmp_path / 'model.onnx')!r}"
    )
    assert main(["export", "--checkpoint", str(ckpt), "--out", ""]) == 2
    _one_line_error(capsys, "--out must name a file")
    (tmp_path / "f").write_text("x")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "f" / "m.onnx")]) == 2
    _one_line_error(capsys, "--out", "is a file, not a folder")


def test_export_refuses_an_existing_file_without_force(checkpoint, tmp_path, capsys):
    _, ckpt = checkpoint
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    _one_line_error(capsys, "--out", "already exists (--force overwrites it)")
    assert out.read_bytes() == b"precious"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--force"]) == 0
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--batch-sizes", "a,b", "argument --batch-sizes: expected comma-separated integers"),
        ("--batch-sizes", "1,0", "argument --batch-sizes: expected comma-separated integers"),
        ("--batch-sizes", "", "argument --batch-sizes: expected comma-separated integers"),
        ("--repeat", "x", "argument --repeat: expected an integer >= 1, got 'x'"),
        ("--repeat", "2", "--repeat must be >= 3, got 2"),
        ("--threads", "0", "argument --threads: expected an integer >= 1"),
        ("--max-accuracy-drop", "nan", "argument --max-accuracy-drop: expected a number"),
        ("--ratio", "1.5", "argument --ratio: expected a fraction in [0, 1)"),
        ("--methods", "int3", "--methods: unknown ['int3']"),
        ("--out", "", "--out must name a file"),
        ("--json", ".", "--json '.' is a folder"),
    ],
)
def test_compress_bad_options_are_usage_errors(checkpoint, capsys, option, value, message):
    _, ckpt = checkpoint
    argv = ["compress", "--checkpoint", str(ckpt), "--max-accuracy-drop", "1", option, value]
    assert main(argv) == 2
    _one_line_error(capsys, message)


def test_compress_out_without_a_budget_is_a_usage_error(checkpoint, tmp_path, capsys):
    _, ckpt = checkpoint
    assert main(["compress", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    _one_line_error(capsys, "--out needs --max-accuracy-drop")


def test_export_bad_opset_is_a_usage_error(checkpoint, tmp_path, capsys):
    _, ckpt = checkpoint
    argv = ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--opset"]
    assert main([*argv, "9"]) == 2
    _one_line_error(capsys, "argument --opset: expected an ONNX opset >= 18, got '9'")
    assert not (tmp_path / "m.onnx").exists()


def test_bad_checkpoint_fails_naming_it(tmp_path, capsys):
    assert (
        main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x.onnx")])
        == 1
    )
    _one_line_error(capsys, "checkpoint")


def test_usage_errors(capsys):
    assert main([]) == 2
    assert main(["export"]) == 2  # --checkpoint and --out are required
    _one_line_error(capsys, "the following arguments are required: --checkpoint, --out")
    assert main(["export", "--help"]) == 0
    sub = build_parser()._subparsers._group_actions[0].choices
    assert {"export", "compress"} <= set(sub)
