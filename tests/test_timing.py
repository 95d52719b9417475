import time

import pytest
import torch

from ryzen_opt import timing


def _busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_time_fn_measures_a_known_duration():
    t = timing.time_fn(lambda: _busy(2e-3), repeat=5, warmup=1, min_sample_s=0)
    assert 1.8e-3 < t.median < 4e-3
    assert t.n == 5 and len(t.samples) == 5 and t.q1 <= t.median <= t.q3


def test_compare_detects_a_real_speedup():
    # 15 samples a side (0.1 s in all): with 7, a loaded 2-core machine (load average 3.3)
    # preempted most of one side's samples and the median read 3.9x.
    c = timing.compare(
        lambda: _busy(4e-3), lambda: _busy(2e-3), repeat=15, warmup=1, min_sample_s=0
    )
    assert 1.6 < c.speedup < 2.4
    assert c.faster and not c.slower and c.ci_low <= c.speedup <= c.ci_high


def test_compare_with_inner_skips_the_calibration_calls():
    calls = {"a": 0, "b": 0}

    def count(k):
        def fn():
            calls[k] += 1

        return fn

    cmp = timing.compare(count("a"), count("b"), repeat=3, warmup=0, inner=1)
    assert calls == {"a": 3, "b": 3} and cmp.baseline.inner == cmp.candidate.inner == 1
    calls.update(a=0, b=0)
    timing.compare(count("a"), count("b"), repeat=3, warmup=0)  # calibrated: many per sample
    assert calls["a"] > 3 and calls["b"] > 3
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="inner must be an int >= 1"):
            timing.compare(count("a"), count("b"), repeat=3, inner=bad)


def test_compare_of_identical_work_is_not_called_faster():
    x = torch.randn(128, 128)
    c = timing.compare(lambda: x @ x, lambda: x @ x, repeat=15, warmup=2)
    assert c.ci_low <= 1.0 + 0.25 and c.ci_high >= 1.0 - 0.25
    assert not (c.faster and c.ci_low > 1.25)


def test_warmup_calls_are_not_timed():
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            _busy(0.05)  # a "compilation" on first call

    t = timing.time_fn(fn, repeat=3, warmup=1, inner=1)
    assert t.median < 0.01


def test_peak_memory_sees_a_large_allocation():
    def alloc():
        x = torch.ones(64 * 1024 * 1024 // 4 * 4)  # 256 MiB
        return float(x[0])

    assert timing.peak_memory(alloc) > 100 * 2**20


@pytest.mark.parametrize(("kw", "match"), [(dict(repeat=2), "repeat"), (dict(warmup=-1), "warmup")])
def test_bad_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        timing.time_fn(lambda: None, **kw)
    with pytest.raises(TypeError, match="callable"):
        timing.time_fn(3)


def test_format_seconds():
    assert timing.format_seconds(1.5e-3) == "1.5 ms"
    assert timing.format_seconds(2.0) == "2 s"
