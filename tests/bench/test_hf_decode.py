"""bench.hf_decode: the side-by-side HF decode benchmark runs end to end on a tiny model."""

import json

import pytest

from bench import hf_decode


def test_hf_decode_tiny_writes_every_variant_with_equal_tokens(tmp_path):
    out = tmp_path / "hf.json"
    argv = [
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--variants",
        "eager,optimize",
        "--batches",
        "1,2",
        "--prompt-len",
        "8",
        "--decode-prompt-len",
        "6",
        "--new-tokens",
        "4",
        "--repeat",
        "1",
        "-o",
        str(out),
    ]
    assert hf_decode.main(argv) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"eager", "optimize"}
    for res in data["results"].values():
        for b in (1, 2):
            d = res[f"decode_b{b}"]
            assert d["tokens_equal_eager"] is True
            assert d["tokens_per_s"] != 0
        assert res["ttft_s"]["n"] == 1
    assert data["config"]["weight_bytes"] > 0
    phases = data["results"]["optimize"]["build_phases_s"]
    assert phases and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= data["results"]["optimize"]["build_s"] + 1e-6
    md = out.with_suffix(".md").read_text()
    assert "| eager |" in md and "| optimize |" in md
    assert "yes / yes" in md


def test_hf_decode_rejects_unknown_variant():
    with pytest.raises(SystemExit):
        hf_decode.main(["--variants", "eager,fast"])


def test_weight_bytes_counts_a_tied_head_once():
    model = hf_decode.build_model("tiny", "cpu", __import__("torch").float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    n = sum(p.numel() for p in model.parameters())  # parameters() already deduplicates
    assert hf_decode.weight_bytes(model) == 4 * n


@pytest.mark.parametrize("text, want", [("none", None), ("None", None), ("30", 30.0)])
def test_time_budget_parses_seconds_or_none(text, want):
    assert hf_decode._parse_budget(text) == want


@pytest.mark.parametrize("bad", ["0", "-5", "soon"])
def test_time_budget_rejects_what_is_not_seconds(bad, capsys):
    with pytest.raises(SystemExit):
        hf_decode.main(["--time-budget", bad])
    assert "--time-budget" in capsys.readouterr().err


def test_time_budget_reaches_optimize(tmp_path):
    out = tmp_path / "hf.json"
    argv = ["--device", "cpu", "--model", "tiny", "--variants", "eager,optimize", "--batches",
            "1", "--prompt-len", "8", "--decode-prompt-len", "6", "--new-tokens", "3",
            "--repeat", "1", "--time-budget", "1e-6", "-o", str(out)]  # fmt: skip
    assert hf_decode.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["config"]["optimize_time_budget_s"] == 1e-6
    notes = " ".join(data["results"]["optimize"]["report_notes"])
    assert "time budget of 1e-06 s" in notes


def test_step_ratio_interval_separates_a_speedup_from_noise():
    base_full, base_one = [10.0, 10.4, 9.8, 10.1], [1.0, 1.1, 0.9, 1.0]
    # Steps twice as fast: the whole interval lies above 1, around 2.
    lo, hi = hf_decode.step_ratio_interval(base_full, base_one, [5.5, 5.7, 5.4, 5.6], base_one)
    assert 1.5 < lo <= hi < 2.5
    # The same samples on both sides: the interval covers 1.
    lo, hi = hf_decode.step_ratio_interval(base_full, base_one, base_full[::-1], base_one)
    assert lo <= 1.0 <= hi
    # One sample a side (--repeat 1): no interval.
    assert hf_decode.step_ratio_interval([10.0], [1.0], [5.0], [1.0]) is None


def test_the_table_shows_the_interval_where_there_is_one():
    def res(tps, iv=None):
        d = {
            "tokens_per_s": tps,
            "bandwidth_fraction": 0.5,
            "tokens_equal_eager": True,
            "x_eager_interval": iv,
        }
        return {
            "ttft_s": {"median": 0.1},
            "decode_b1": d,
            "peak_bytes": 0,
            "build_s": 0.0,
            "note": "",
        }

    data = {
        "config": {"batches": [1], "prompt_len": 8, "new_tokens": 4},
        "results": {"eager": res(10.0), "optimize": res(20.0, [1.5, 2.6])},
    }
    _, rows = hf_decode.table(data)
    assert rows[0][3] == "1.00x" and rows[1][3] == "2.00x [1.50, 2.60]"
