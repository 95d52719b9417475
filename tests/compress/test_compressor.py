"""SemanticCompressor: one verdict per artifact, side by side with fp32; selection; configs."""

from __future__ import annotations

import json

import pytest

from ryzen_opt import SemanticCompressor
from ryzen_opt.compress import ArtifactResult, CompressConfig, PruneConfig
from ryzen_opt.compress.compressor import select


@pytest.fixture(scope="module")
def report(model, task, tmp_path_factory):
    # choose_by_measurement (s8/u8 variants) is exercised by tests/test_cli.py; off here.
    cfg = CompressConfig(
        eval_samples=48,
        batch_sizes=(1, 4),
        repeat=3,
        choose_by_measurement=False,
        prune=PruneConfig(calibration_samples=16, finetune_steps=2),
    )
    comp = SemanticCompressor(model, task, cfg, workdir=tmp_path_factory.mktemp("compress"))
    return comp.run(
        ["int8_dynamic", "int4_weight_only", "structured_prune"], max_accuracy_drop=100.0
    )


def test_report_has_fp32_first_and_every_method(report):
    assert [r.method for r in report.results] == [
        "fp32",
        "int8_dynamic",
        "int4_weight_only",
        "structured_prune",
    ]
    assert report.baseline.method == "fp32" and report.baseline.accuracy_drop == 0.0
    assert report.baseline.size_ratio == 1.0


def test_sizes_and_latencies_are_measured(report):
    import os

    for r in report.results:
        assert r.size_bytes == os.path.getsize(r.path)
        for key in ("prefill@1", "decode@1", "prefill@4", "decode@4"):
            lat = r.latency[key]
            assert lat["median_s"] > 0 and lat["fp32_median_s"] > 0 and lat["n"] == 3
            assert lat["ci"][0] <= lat["speedup"] <= lat["ci"][1]
    assert report.result("int8_dynamic").size_ratio < 0.9
    assert report.result("structured_prune").details["removed_fraction"] == pytest.approx(
        0.3, abs=0.05
    )


def test_fp32_onnx_accuracy_equals_pytorch(report):
    # Greedy generations are identical, so exact match must be too.
    assert report.baseline.accuracy == report.pytorch_accuracy


def test_chosen_is_smallest_within_budget(report):
    ok = [r for r in report.results if r.accuracy_drop <= 100.0]
    assert report.chosen == min(ok, key=lambda r: r.size_bytes).method


def test_report_serializes_and_plots(report, tmp_path):
    p = report.to_json(tmp_path / "r.json")
    data = json.loads(p.read_text())
    assert data["environment"]["onnxruntime"]
    assert len(data["results"]) == 4
    assert report.plot(tmp_path / "r.png").stat().st_size > 1000
    assert report.table().row_count == 4


def _fake(method, size, drop, speed):
    lat = {"decode@8": {"speedup": speed}}
    return ArtifactResult(method, f"{method}.onnx", size, 1.0, size, 0.9, drop, lat, 0.0)


def test_select_respects_budget_and_preference():
    rs = [
        _fake("fp32", 100, 0.0, 1.0),
        _fake("small", 20, 3.0, 1.5),
        _fake("mid", 40, 0.5, 2.5),
        _fake("fast", 60, 0.9, 3.0),
    ]
    assert select(rs, 1.0, "size", 8) == "mid"
    assert select(rs, 1.0, "speed", 8) == "fast"
    assert select(rs, 5.0, "size", 8) == "small"
    assert select(rs, 0.0, "size", 8) == "fp32"


def test_run_rejects_bad_arguments(model, task, tmp_path):
    comp = SemanticCompressor(model, task, workdir=tmp_path)
    with pytest.raises(ValueError, match="methods"):
        comp.run(["int3"])
    with pytest.raises(TypeError, match="methods"):
        comp.run("int8_dynamic")
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        comp.run(["fp32"], max_accuracy_drop=-1)
    with pytest.raises(ValueError, match="prefer"):
        comp.run(["fp32"], prefer="cheap")
    with pytest.raises(TypeError, match="model"):
        SemanticCompressor("model", task)
    with pytest.raises(TypeError, match="task"):
        SemanticCompressor(model, None)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"eval_samples": 0}, "eval_samples"),
        ({"threads": 0}, "threads"),
        ({"batch_sizes": ()}, "batch_sizes"),
        ({"repeat": 2}, "repeat"),
        ({"prune": {"kind": "structured"}}, "prune"),
        ({"warmup": -1}, "warmup"),
        ({"min_sample_s": 0}, "min_sample_s"),
        ({"aa_tolerance": float("nan")}, "aa_tolerance"),
        ({"aa_tolerance": 1.5}, "aa_tolerance"),
    ],
)
def test_compress_config_validates(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CompressConfig(**kwargs)
