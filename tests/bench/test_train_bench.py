"""bench.train: baseline and optimize_training() side by side, every model in its --quick size."""

import json

import pytest

from bench import train as bench_train


def test_train_bench_quick_writes_tables_plots_and_equal_loss_curves(tmp_path):
    argv = [
        "--quick",
        "--models",
        "default,llama-1b,seed-gpu",
        "--steps",
        "5",
        "--out",
        str(tmp_path),
    ]
    assert bench_train.main(argv) == 0
    for name in ("default", "llama-1b", "seed-gpu"):
        data = json.loads((tmp_path / f"train-{name}-quick.json").read_text())
        assert set(data["variants"]) == {"eager", "optimized"}
        opt = data["variants"]["optimized"]
        assert len(opt["losses"]) == 5 and len(opt["step_samples_s"]) == 3
        assert opt["loss_within_liger_tol"] is True
        assert opt["speedup_ci"][0] <= opt["speedup"] <= opt["speedup_ci"][1]
        assert data["environment"]["commit"] and data["loadavg_before"]
        assert (tmp_path / f"train-{name}-quick.png").stat().st_size > 0
        md = (tmp_path / f"train-{name}-quick.md").read_text()
        assert "| optimized |" in md and "optimize_training()" in md


@pytest.mark.parametrize(
    "argv", [["--variants", "optimized"], ["--models", "gpt9"], ["--steps", "2"]]
)
def test_train_bench_bad_arguments_exit_with_usage(argv, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench_train.main([*argv, "--out", str(tmp_path)])
    assert e.value.code == 2
