"""bench.instant_goals: the goal figures from an accuracy table."""

from __future__ import annotations

import math

import pytest

from bench.instant_goals import goal_rows

ACC = {
    "a": {"base": 0.4, "LoRA (trained)": 0.8, "T2L recon, train desc": 0.8, "SVF oracle": 0.6},
    "b": {"base": 0.9, "LoRA (trained)": 0.9, "T2L recon, train desc": 0.7, "SVF oracle": 0.9},
    "h": {"base": 0.1, "nearest library LoRA": 0.3, "T2L recon, held-out desc": 0.5,
          "T2L SFT, held-out desc": None},
}  # fmt: skip


def test_fractions_of_the_lora_and_shares_of_its_gain():
    _, rows, data = goal_rows(ACC, 100, {"a", "b"})
    a = data["seen"]["a"]
    assert a["SVF oracle"]["of_lora"] == pytest.approx(0.75)
    assert a["SVF oracle"]["share_of_gain"] == pytest.approx(0.5)  # (0.6 - 0.4) / (0.8 - 0.4)
    # the base already at the LoRA's accuracy: no gain to share
    assert data["seen"]["b"]["SVF oracle"]["share_of_gain"] is None
    summed = data["seen"]["summed"]["T2L recon, train desc"]
    assert summed["of_lora"] == pytest.approx(1.5 / 1.7)
    assert summed["share_of_gain"] == pytest.approx((1.5 - 1.3) / (1.7 - 1.3))
    assert sum(r[0] == "summed (seen)" for r in rows) == 2


def test_held_out_differences_carry_their_standard_error():
    _, _, data = goal_rows(ACC, 100, {"a", "b"})
    h = data["held_out"]["h"]
    assert set(h) == {"T2L recon, held-out desc"}  # a missing method makes no row
    d = h["T2L recon, held-out desc"]
    assert d["minus_base"] == pytest.approx(0.4) and d["minus_nearest"] == pytest.approx(0.2)
    se = math.hypot(math.sqrt(0.5 * 0.5 / 100), math.sqrt(0.3 * 0.7 / 100))
    assert d["se_vs_nearest"] == pytest.approx(se)
