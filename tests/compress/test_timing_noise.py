"""The fp32-vs-fp32 (A/A) check: noisy timing is reported as noise and never picks an artifact.

Timing is injected, so each case is exactly the situation it names whatever the machine's
load: int8 is "3x faster" but larger, int4 is the smallest.
"""

from __future__ import annotations

import pytest

from ryzen_opt.compress import CompressConfig, SemanticCompressor
from ryzen_opt.timing import Comparison, Timing

FAKE_SPEEDUP = {"int8_dynamic": 3.0, "int4_weight_only": 1.1}


def _cmp(speedup: float) -> Comparison:
    t = Timing(1e-3, 1e-5, 1e-3, 1e-3, 5, 1, (1e-3,) * 5)
    c = Timing(1e-3 / speedup, 1e-5, 1e-3 / speedup, 1e-3 / speedup, 5, 1, (1e-3 / speedup,) * 5)
    return Comparison(t, c, speedup, speedup * 0.99, speedup * 1.01, 0.95)


@pytest.fixture(scope="module")
def comp(model, task, tmp_path_factory):
    cfg = CompressConfig(eval_samples=16, batch_sizes=(1, 4), repeat=3)
    return SemanticCompressor(model, task, cfg, workdir=tmp_path_factory.mktemp("noise"))


def _run(comp, monkeypatch, opening: float, closing: float):
    """Run with fp32-vs-fp32 reading ``opening`` before the others and ``closing`` after."""
    aa = iter([opening] * 4 + [closing] * 4)  # 2 phases x 2 batch sizes, twice
    variant_races = []

    def fake_time(self, path, phase, batch):
        stem = path.stem
        if stem == "fp32":
            return _cmp(next(aa))
        return _cmp(FAKE_SPEEDUP["int8_dynamic" if stem.startswith("int8") else stem])

    def fake_compare(self, base, cand):
        variant_races.append(1)
        return _cmp(1.0)

    monkeypatch.setattr(SemanticCompressor, "_time", fake_time)
    monkeypatch.setattr(SemanticCompressor, "_compare", fake_compare)
    report = comp.run(["int8_dynamic", "int4_weight_only"], max_accuracy_drop=100.0, prefer="speed")
    return report, variant_races


def test_quiet_timing_lets_speed_choose(comp, monkeypatch):
    report, races = _run(comp, monkeypatch, 1.02, 0.97)
    assert report.speed_trusted and report.aa_range == (0.97, 1.02)
    assert report.chosen == "int8_dynamic"  # the fastest, as prefer="speed" asks
    assert races == [1]  # the s8/u8 variants were timed against each other
    assert "NOISE" not in report.speed_note()
    assert report.to_dict()["speed_trusted"] is True


@pytest.mark.parametrize("opening,closing", [(1.30, 1.0), (1.0, 0.90)])
def test_noisy_ab_row_marks_speed_as_noise_and_chooses_by_size(comp, monkeypatch, opening, closing):
    report, races = _run(comp, monkeypatch, opening, closing)
    assert not report.speed_trusted
    assert report.chosen == "int4_weight_only"  # the smallest; its "speed" is ignored
    note = report.speed_note()
    assert "speed figures are NOISE" in note and "size and accuracy only" in note
    assert report.table().caption == note
    assert report.to_dict()["speed_trusted"] is False
    details = report.result("int8_dynamic").details
    if opening != 1.0:  # the opening check failed: the variant race was not run on noise
        assert races == [] and details["chosen_variant"] == details["default_variant"]
        assert "noise" in details["note"]
    assert report.baseline.details["aa_closing_speedups"] == {
        k: closing for k in ("prefill@1", "decode@1", "prefill@4", "decode@4")
    }


def test_paired_speedup_is_the_median_of_per_pair_ratios():
    # The candidate is 2x faster in every pair taken at the same load, but the load rose
    # while pairs 1-2 ran on the candidate's side only: the ratio of medians reads 0.5x.
    from ryzen_opt.compress.compressor import paired_speedup

    b, c = (1.0, 1.0, 1.0, 4.0, 4.0), (0.5, 2.0, 2.0, 2.0, 2.0)
    base = Timing(1.0, 0.0, 1.0, 4.0, 5, 1, b)
    cand = Timing(2.0, 0.0, 2.0, 2.0, 5, 1, c)
    raw = Comparison(base, cand, 0.5, 0.4, 0.6, 0.95)
    out = paired_speedup(raw)
    assert out.speedup == 2.0 and out.ci_low <= 2.0 <= out.ci_high
    assert out.baseline == base and out.candidate == cand
