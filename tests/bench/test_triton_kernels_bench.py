"""bench.triton_kernels: several candidates of one case divide the same baseline samples."""

import time

import pytest

from bench import triton_kernels


def _sleeper(s):
    return lambda: time.sleep(s)


def test_every_candidate_of_a_case_divides_the_same_baseline_samples():
    rows = triton_kernels._cmp_all(
        _sleeper(4e-3), {"fast": _sleeper(2e-3), "same": _sleeper(4e-3)}, device="cpu", repeat=6
    )
    assert list(rows) == ["fast", "same"]
    assert rows["fast"]["baseline_s"] == rows["same"]["baseline_s"]
    assert rows["fast"]["timed_with"] == ["baseline", "fast", "same"]
    assert 1.5 < rows["fast"]["speedup"] < 2.5
    assert 0.8 < rows["same"]["speedup"] < 1.25
    lo, hi = rows["fast"]["ci"]
    assert lo <= rows["fast"]["speedup"] <= hi


def test_a_candidate_named_baseline_is_refused():
    with pytest.raises(ValueError, match="baseline"):
        triton_kernels._cmp_all(_sleeper(0), {"baseline": _sleeper(0)}, device="cpu")


def test_another_backend_row_keeps_its_timing_and_names_the_backend():
    import torch

    row = {"op": "attention", "shape": [1, 2, 8, 4], "dtype": "bf16", "baseline": "SDPA cudnn"}
    timed = {"baseline_s": 2.0, "triton_s": 1.0, "speedup": 2.0, "ci": [1.9, 2.1],
             "timed_with": ["baseline", "triton", "cutlass"]}  # fmt: skip
    ref = torch.ones(4)
    r = triton_kernels._other_backend(row, "cutlass", timed, lambda: ref * 1.5, ref, 8.0e12)
    assert r["backend"] == "cutlass" and r["op"] == "attention" and r["speedup"] == 2.0
    assert r["triton_TFLOPs"] == pytest.approx(8.0) and r["rel_error"] == pytest.approx(0.5)
    assert "backend" not in timed  # the shared timing is not changed
