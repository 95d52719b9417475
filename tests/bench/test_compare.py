import numpy as np
import pyperf
import pytest

from bench.compare import compare_files, compare_values, main, mann_whitney_p
from ryzen_opt import timing


def _suite(path, values_by_name):
    benches = []
    for name, values in values_by_name.items():
        runs = [
            pyperf.Run(
                [float(v) for v in chunk],
                metadata={"name": name, "loops": 1},
                collect_metadata=False,
            )
            for chunk in np.array_split(np.asarray(values), 4)
        ]
        benches.append(pyperf.Benchmark(runs))
    pyperf.BenchmarkSuite(benches).dump(str(path))
    return path


def test_a_vs_a_on_the_same_distribution_is_no_change(tmp_path):
    rng = np.random.default_rng(0)
    base = {f"b{i}": rng.normal(1e-3, 3e-5, 40) for i in range(10)}
    again = {f"b{i}": rng.normal(1e-3, 3e-5, 40) for i in range(10)}
    old, new = _suite(tmp_path / "a.json", base), _suite(tmp_path / "b.json", again)
    verdicts, only_old, only_new = compare_files(old, new)
    assert [v.verdict for v in verdicts] == ["no change"] * 10
    assert not only_old and not only_new
    assert main([str(old), str(new)]) == 0


def test_a_real_a_vs_a_timing_run_is_no_change():
    import torch

    x = torch.randn(96, 96)
    c = timing.compare(lambda: x @ x, lambda: x @ x, repeat=30, warmup=2)
    v = compare_values("matmul", c.baseline.samples, c.candidate.samples)
    assert v.verdict == "no change", v


def test_a_ten_percent_slowdown_is_flagged_slower_and_a_speedup_faster(tmp_path):
    rng = np.random.default_rng(1)
    old = _suite(
        tmp_path / "a.json", {"x": rng.normal(1e-3, 2e-5, 40), "y": rng.normal(1e-3, 2e-5, 40)}
    )
    new = _suite(
        tmp_path / "b.json",
        {
            "x": rng.normal(1.1e-3, 2e-5, 40),
            "y": rng.normal(0.8e-3, 2e-5, 40),
            "z": rng.normal(1e-3, 2e-5, 40),
        },
    )
    verdicts, _, only_new = compare_files(old, new)
    assert {v.name: v.verdict for v in verdicts} == {"x": "slower", "y": "faster"}
    assert only_new == ["z"]
    assert main([str(old), str(new)]) == 1


def test_a_significant_but_tiny_change_is_no_change():
    rng = np.random.default_rng(2)
    old = rng.normal(1e-3, 1e-6, 400)
    new = rng.normal(1.01e-3, 1e-6, 400)  # 1%: significant, below the 5% minimum effect
    v = compare_values("t", old, new)
    assert v.p_value < 1e-6 and v.verdict == "no change"


def test_a_large_but_noisy_change_is_no_change():
    v = compare_values("t", [1.0, 2.0, 1.5], [1.2, 2.1, 1.6])
    assert v.verdict == "no change"


def test_mann_whitney_extremes():
    assert mann_whitney_p(np.arange(20), np.arange(20)) > 0.9
    assert mann_whitney_p(np.arange(20), np.arange(100, 120)) < 1e-6


def test_bad_files_exit_2(tmp_path, capsys):
    (tmp_path / "junk.json").write_text("{not json")
    assert main([str(tmp_path / "junk.json"), str(tmp_path / "junk.json")]) == 2
    assert main([str(tmp_path / "missing.json"), str(tmp_path / "x.json")]) == 2
    with pytest.raises(ValueError, match="min_effect"):
        compare_values("t", [1, 2], [1, 2], min_effect=2)
