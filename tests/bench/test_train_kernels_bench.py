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
