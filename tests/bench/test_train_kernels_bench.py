"""bench.train_kernels: every training op against eager, forward + backward, in one run."""

import json

import pytest
import torch

pytest.importorskip("triton")

from bench import train_kernels as bt  # noqa: E402

OPS = [
    "linear_cross_entropy",
    "rms_norm_residual",
    "layer_norm_residual",
    "swiglu",
    "gelu_tanh",
    "rotary",
    "attention_causal",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run (interpreter)")
def test_quick_cpu_run_writes_rows_for_every_op(tmp_path):
    assert (
        bt.main(["--device", "cpu", "--quick", "--dtype", "float32", "--out", str(tmp_path)]) == 0
    )
    data = json.loads((tmp_path / "train_kernels.json").read_text())
    rows = data["rows"]
    assert [r["op"] for r in rows] == OPS
    for r in rows:
        # fp32 triton against fp32 eager: outputs and every input gradient agree.
        assert r["rel_err_vs_eager"] < 1e-4, r
        assert r["eager_s"] > 0 and r["triton_s"] > 0 and r["n"] == 3
        assert r["speedup_vs_eager"] == pytest.approx(r["eager_s"] / r["triton_s"])
        assert "compile_s" not in r  # no torch.compile column on the CPU
    assert rows[0]["eager_peak_bytes"] >= 0 and rows[0]["triton_peak_bytes"] >= 0
    md = (tmp_path / "train_kernels.md").read_text()
    assert md.startswith("# bench.train_kernels") and "Triton interpreter" in md


@pytest.mark.parametrize(
    "args, name",
    [
        (["--repeat", "2"], "--repeat"),
        (["--device", "tpu"], "--device"),
        (["--only", "softmax"], "--only"),
        (["--dtype", "float64"], "--dtype"),
    ],
)
def test_bad_arguments_name_the_argument(args, name, capsys):
    with pytest.raises(SystemExit):
        bt.main(["--device", "cpu", *args] if "--device" not in args else args)
    assert name in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in for the CUDA graph")
def test_graph_timings_and_a_failed_capture_are_recorded(monkeypatch):
    # CUDA-graph capture needs a GPU; a pass-through stands in for it so the bookkeeping runs.
    case = bt.cases("cpu", torch.float32, bt.QUICK)[3]  # swiglu
    monkeypatch.setattr(bt, "_graphed", lambda fn: fn)
    row = bt.measure(case, "cpu", 3, 1, False, True)
    assert row["graph_eager_s"] > 0 and row["graph_triton_s"] > 0
    assert row["graph_speedup_vs_eager"] == pytest.approx(
        row["graph_eager_s"] / row["graph_triton_s"]
    )

    def fail(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(bt, "_graphed", fail)
    row = bt.measure(case, "cpu", 3, 1, False, True)
    assert row["graph_triton_error"].startswith("RuntimeError: operation not permitted")
    assert "graph_triton_s" not in row
    headers, table = bt._table([row])
    assert table[0][headers.index("graph: eager / compile / triton") + 1] == "error"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run (interpreter)")
def test_launch_compare_times_tritons_own_path_and_restores_the_switch(monkeypatch):
    from ryzen_opt.kernels.triton import _launcher

    seen = []
    monkeypatch.setattr(_launcher, "set_enabled", lambda flag: seen.append(flag) or True)
    case = bt.cases("cpu", torch.float32, bt.QUICK)[3]  # swiglu
    row = bt.measure(case, "cpu", 3, 1, False, False, launch_compare=True)
    assert row["triton_plain_s"] > 0
    assert row["speedup_vs_tritons_launch"] == pytest.approx(
        row["triton_plain_s"] / row["triton_s"]
    )
    # every timed call of the plain column turns the direct path off, then back on
    assert (
        seen
        and seen[0::2] == [False] * (len(seen) // 2)
        and seen[1::2] == [True] * (len(seen) // 2)
    )
    headers, table = bt._table([row])
    assert table[0][headers.index("direct vs Triton's launch")].endswith("x")
    headers, _ = bt._table([bt.measure(case, "cpu", 3, 1, False, False)])
    assert "triton, Triton's launch" not in headers


def test_the_attention_tile_sweep_needs_a_gpu_and_says_so(capsys):
    import torch

    from bench import train_attention_tiles

    if torch.cuda.is_available():
        pytest.skip("on a GPU the sweep runs for real (bench, not a test)")
    with pytest.raises(SystemExit) as e:
        train_attention_tiles.main([])
    assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    assert all(len(t) == 4 for t in train_attention_tiles.TILES)
