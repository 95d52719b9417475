"""One-process mode of bench.model and bench.kernels: every column timed in one process
(ryzen_opt.timing.time_interleaved), written as pyperf JSON that pyperf reads back."""

import json
import re
import subprocess
import sys

import pyperf
import pytest
import torch

from bench import inprocess, kernel_cases
from bench import kernels as bk
from bench import model as bm
from ryzen_opt import timing
from ryzen_opt.models import ModelConfig, SimpleTransformerModel


def test_time_interleaved_varies_the_order_and_times_every_callable():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    out = timing.time_interleaved(fns, repeat=6, warmup=1, min_sample_s=0)
    assert list(out) == ["a", "b", "c"]
    assert all(t.n == 6 and len(t.samples) == 6 and t.median >= 0 for t in out.values())
    rounds = calls[-18:]  # calibration calls come first; inner is 1 with min_sample_s=0
    firsts = [rounds[i * 3] for i in range(6)]
    assert sorted(set(firsts)) == ["a", "b", "c"]  # each callable leads some rounds
    two = []
    timing.time_interleaved(
        {"A": lambda: two.append("A"), "B": lambda: two.append("B")},
        repeat=4,
        warmup=0,
        min_sample_s=0,
    )
    assert "".join(two[-8:]) == "ABBAABBA"  # each side leads and follows equally often


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_interleaving_order_balances_first_places_and_predecessors(k):
    from collections import Counter

    orders = timing._balanced_orders(k)
    assert all(sorted(o) == list(range(k)) for o in orders)
    firsts = Counter(o[0] for o in orders)
    assert set(firsts.values()) == {len(orders) // k}
    pairs = Counter((o[i], o[i + 1]) for o in orders for i in range(k - 1))
    assert len(pairs) == k * (k - 1) and len(set(pairs.values())) <= 1


def test_time_interleaved_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fns"):
        timing.time_interleaved({})
    with pytest.raises(TypeError, match="fns\\['x'\\]"):
        timing.time_interleaved({"x": 3})
    with pytest.raises(ValueError, match="repeat"):
        timing.time_interleaved({"x": lambda: None}, repeat=2)
    with pytest.raises(ValueError, match="settle_s"):
        timing.time_interleaved({"x": lambda: None}, settle_s=-1)


def test_time_interleaved_pauses_after_each_sample_outside_the_timing():
    import time

    t0 = time.perf_counter()
    out = timing.time_interleaved(
        {"a": lambda: None, "b": lambda: None}, repeat=3, warmup=0, min_sample_s=0, settle_s=0.02
    )
    assert time.perf_counter() - t0 >= 6 * 0.02  # one pause per sample
    assert all(t.median < 0.01 for t in out.values())  # the pauses are not in the samples


def test_default_mode_is_inprocess_for_quick_and_cuda_only():
    assert inprocess.default_mode("cpu", quick=True) == "inprocess"
    assert inprocess.default_mode("cuda", quick=False) == "inprocess"
    assert inprocess.default_mode("cpu", quick=False) == "workers"


def _pyperf_show(path) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "pyperf", "show", "--quiet", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture
def tiny_model(monkeypatch):
    """bench.model on a 1-layer model, a 2x8 prefill and 4 new tokens."""

    def make_model(device):
        torch.manual_seed(0)
        return SimpleTransformerModel(ModelConfig(num_layers=1, max_seq_len=24)).to(device).eval()

    monkeypatch.setattr(bm, "make_model", make_model)
    monkeypatch.setattr(bm, "PREFILL", (2, 8))
    monkeypatch.setattr(bm, "NEW_TOKENS", 4)

    # A third column that is not the baseline: the baseline's weights, scaled head.
    def build_scaled(model, device):
        with torch.no_grad():
            model.head.weight.mul_(1.5)
        return model

    variants = dict(bm.VARIANTS)
    variants["scaled"] = bm.Variant("scaled", build_scaled)
    variants["gpu only"] = bm.Variant("gpu only", bm.VARIANTS["baseline"].build, lambda d: "no")
    monkeypatch.setattr(bm, "VARIANTS", variants)
    # Peak memory runs in fresh processes on the CPU (the full-size model there): replaced
    # here by a stand-in that records which variants asked.
    asked = []

    def fresh(name, workload, device):
        asked.append((name, workload))
        return {w: 1 << 20 for w in bm.WORKLOADS}

    monkeypatch.setattr(bm, "peak_memory_fresh", fresh)
    return asked


def test_model_inprocess_writes_pyperf_json_with_every_variant_and_workload(tmp_path, tiny_model):
    out = tmp_path / "model.json"
    names = ["baseline", "onnxruntime", "scaled", "gpu only"]
    res = bm.run_inprocess(names, "cpu", 3, out)
    suite = pyperf.BenchmarkSuite.load(str(out))
    got = set(suite.get_benchmark_names())
    want = {f"model/{w}/{n}/cpu" for n in names[:3] for w in bm.WORKLOADS}
    assert got == want  # baseline column present, the unavailable variant absent
    for b in suite.get_benchmarks():
        assert b.get_nvalue() == 3 and b.get_metadata()["mode"] == "inprocess"
    assert "model/ttft/baseline/cpu" in _pyperf_show(out)
    assert res["gpu only"]["reason"] == "no"
    assert res["baseline"]["max_logit_diff"] == 0.0
    assert res["onnxruntime"]["max_logit_diff"] < 1e-4
    assert res["scaled"]["max_logit_diff"] > 0.1
    assert sorted(tiny_model) == [(n, "all") for n in sorted(names[:3])]  # one per variant
    assert set(res["scaled"]["peak"]) == set(bm.WORKLOADS)


def test_model_main_quick_defaults_to_inprocess_and_says_so_in_the_table(
    tmp_path, tiny_model, monkeypatch, capsys
):
    out = tmp_path / "m.json"
    argv = ["bench.model", "--quick", "--variants", "baseline,scaled", "--repeat", "3"]
    monkeypatch.setattr("sys.argv", [*argv, "-o", str(out)])
    assert bm.main() == 0
    text = capsys.readouterr().out
    assert "quick: 3 values per cell" in text and "mode inprocess" in text
    assert "OptimizeConfig(repeat=8, warmup=2)" in text  # the quick optimize() settings
    md = out.with_suffix(".md").read_text()
    assert "quick mode" in md and "| scaled |" in md and "| baseline |" in md
    # Each speed-up (TTFT, batch 1, batch 16) with its bootstrap interval.
    row = next(line for line in md.splitlines() if line.startswith("| scaled |"))
    assert len(re.findall(r"\d\.\d\dx \[\d+\.\d\d, \d+\.\d\d\]", row)) == 3
    summary = json.loads((tmp_path / "m-summary.json").read_text())
    assert summary["mode"] == "inprocess" and summary["values_per_cell"] == 3
    assert set(summary["variants"]) == {"baseline", "scaled"}
    assert "cpu_isa" in summary["environment"]


def test_model_inprocess_rejects_a_repeat_below_three(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bench.model", "--quick", "--repeat", "2"])
    with pytest.raises(SystemExit) as e:
        bm.main()
    assert e.value.code == 2 and "--repeat" in capsys.readouterr().err


def test_peak_memory_child_measures_every_workload_smallest_first(tiny_model, capsys):
    bm._peak_memory_child("baseline", "all", "cpu")
    peaks = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peak_bytes"]
    assert list(peaks) == ["decode b1", "decode b16", "ttft"]
    assert all(isinstance(v, int) and v >= 0 for v in peaks.values())


def _tiny_cases():
    f32 = torch.float32
    return [
        kernel_cases._matmul_case(8, 16, 8, f32, "tiny 8x16x8 +bias+gelu", "gelu"),
        kernel_cases._layer_norm_case(4, 32, f32, "tiny 4x32 +residual"),
        kernel_cases._copy_case(1 << 16, f32, "cpu"),
    ]


def test_kernels_inprocess_writes_pyperf_json_with_torch_and_every_served_backend(tmp_path):
    out = tmp_path / "k.json"
    rows = bk.run_inprocess(_tiny_cases(), "cpu", 3, out)
    names = set(pyperf.BenchmarkSuite.load(str(out)).get_benchmark_names())
    for row in rows:
        case = row["case"]
        assert bk._bench_name(case, "torch", "cpu") in names  # the baseline column
        for backend, info in row["backends"].items():
            served = info["reason"] is None
            assert (bk._bench_name(case, backend, "cpu") in names) == served
            if served:
                assert "wrong" not in info and info["rel_error"] <= 1e-5
    served = {b for r in rows for b, i in r["backends"].items() if i["reason"] is None}
    assert "numba" in served
    assert "matmul/tiny 8x16x8 +bias+gelu/numba/float32/cpu" in _pyperf_show(out)


def test_kernels_main_quick_runs_inprocess_and_labels_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bk, "cases", lambda device, quick: _tiny_cases())
    out = tmp_path / "k.json"
    monkeypatch.setattr("sys.argv", ["bench.kernels", "--quick", "--repeat", "3", "-o", str(out)])
    assert bk.main() == 0
    text = capsys.readouterr().out
    assert "mode inprocess" in text and "3 interleaved values per cell" in text
    summary = json.loads((tmp_path / "k-summary.json").read_text())
    assert summary["mode"] == "inprocess" and summary["values_per_cell"] == 3
    assert out.exists()
    # Every served speed-up carries its bootstrap interval, in the JSON and in the table.
    served = [
        b for c in summary["cases"] for b in c["backends"].values() if b["speedup"] is not None
    ]
    assert served
    for b in served:
        lo, hi = b["speedup_ci"]
        assert 0 < lo <= hi
    md = (tmp_path / "k.md").read_text()
    assert "bootstrap interval" in md and re.search(r"\d\.\d\dx \[\d", md)


def test_gpu_run_script_runs_model_and_kernels_inprocess_and_logs_wall_times(tmp_path):
    """bench/gpu_run.sh with stand-ins for python3 and nvidia-smi that record their args."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls.txt"
    for name in ("python3", "nvidia-smi"):
        (fake / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n')
        (fake / name).chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out)}
    res = subprocess.run(
        ["bash", "bench/gpu_run.sh", "model", "kernels", "nope"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    ran = calls.read_text()
    assert "-m bench.model --device cuda --mode inprocess" in ran
    assert "-m bench.kernels --device cuda --quick --mode inprocess" in ran
    log = (out / "run.log").read_text()
    import re

    for part in ("model", "kernels"):
        assert re.search(rf"== {part}: wall \d+ s, exit 0\n", log), log
    assert "unknown part nope" in log and re.search(r"== nope: wall \d+ s, exit 1\n", log)


def test_pyperf_options_in_inprocess_mode_exit_2_naming_the_mode(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bench.kernels", "--quick", "-p", "2"])
    with pytest.raises(SystemExit) as e:
        bk.main()
    assert e.value.code == 2 and "--mode workers" in capsys.readouterr().err


@pytest.mark.gpu
def test_model_inprocess_on_cuda_times_every_variant_and_measures_peak_memory_here(
    tmp_path, tiny_model
):
    out = tmp_path / "model.json"
    names = ["baseline", "torch.compile", "optimize()", "onnxruntime"]
    res = bm.run_inprocess(names, "cuda", 3, out)
    got = set(pyperf.BenchmarkSuite.load(str(out)).get_benchmark_names())
    assert got == {f"model/{w}/{n}/cuda" for n in names[:3] for w in bm.WORKLOADS}
    assert res["onnxruntime"]["reason"] is not None  # CPU-only column, said so
    assert tiny_model == []  # no fresh processes on CUDA: allocated bytes are exact here
    assert all(isinstance(res[n]["peak"][w], int) for n in names[:3] for w in bm.WORKLOADS)


@pytest.mark.gpu
def test_kernels_inprocess_on_cuda_writes_torch_and_triton_columns(tmp_path):
    bf16 = torch.bfloat16
    cs = [
        kernel_cases._matmul_case(64, 128, 64, bf16, "tiny bf16 64x128x64"),
        kernel_cases._layer_norm_case(8, 256, bf16, "tiny bf16 8x256 +residual"),
    ]
    out = tmp_path / "k.json"
    rows = bk.run_inprocess(cs, "cuda", 3, out)
    names = set(pyperf.BenchmarkSuite.load(str(out)).get_benchmark_names())
    for row in rows:
        assert bk._bench_name(row["case"], "torch", "cuda") in names
        assert bk._bench_name(row["case"], "triton", "cuda") in names
        assert "wrong" not in row["backends"]["triton"]


def test_quick_model_run_has_the_baseline_optimize_compile_and_onnxruntime_columns(
    tmp_path, monkeypatch
):
    seen = {}

    def fake_run(names, device, repeat, output):
        seen.update(names=names, device=device, repeat=repeat)
        return {}

    monkeypatch.setattr(bm, "run_inprocess", fake_run)
    monkeypatch.setattr(bm, "_report", lambda *a, **k: seen.update(report=k))
    monkeypatch.setattr("sys.argv", ["bench.model", "--quick", "-o", str(tmp_path / "m.json")])
    assert bm.main() == 0
    assert seen["names"] == ["baseline", "torch.compile", "optimize()", "onnxruntime"]
    assert seen["repeat"] == inprocess.QUICK_REPEAT and seen["report"]["mode"] == "inprocess"


def test_speedup_interval_and_its_cell():
    from bench.common import speedup_interval, with_interval

    base, fast = [2.0, 2.1, 1.9, 2.05, 1.95], [1.0, 1.05, 0.95, 1.02, 0.98]
    lo, hi = speedup_interval(base, fast)
    assert 1.7 < lo <= 2.0 <= hi < 2.3
    lo, hi = speedup_interval(base, base[::-1])  # the same samples: the interval covers 1
    assert lo <= 1.0 <= hi
    assert speedup_interval([1.0], fast) is None and speedup_interval(None, fast) is None
    assert with_interval(2.0, (1.8, 2.25)) == "2.00x [1.80, 2.25]"
    assert with_interval(0.5, None) == "0.50x"
