"""bench.adapters: every column on the same prompt, the PEFT column gives the same ids."""

from __future__ import annotations

import json

import pytest
import torch

from bench import adapters as ba
from ryzen_opt.adapters import LoraConfig, add_lora, save_adapter
from ryzen_opt.models import save_checkpoint
from tests.adapters.conftest import make_stm, randomize


def _ran(route: str) -> tuple[int, int]:
    """(decode steps the fast path computed, decode steps) from a fused column's route."""
    fast, total = route.split("(fast path ran ")[1].split(" decode steps)")[0].split(" of ")
    return int(fast), int(total)


@pytest.fixture
def inputs(tmp_path):
    save_checkpoint(make_stm(), tmp_path / "ckpt")
    m = add_lora(make_stm(), LoraConfig(rank=4))
    randomize(m, "default", seed=40, std=0.5)
    save_adapter(m, tmp_path / "adapter")
    return tmp_path


def test_one_run_writes_operations_decode_and_accuracy(inputs):
    out = inputs / "adapters.json"
    argv = ["--checkpoint", str(inputs / "ckpt"), "--adapter", str(inputs / "adapter")]
    argv += ["--repeat", "3", "--eval-samples", "4", "--new-tokens", "4", "-o", str(out)]
    assert ba.main(argv) == 0
    data = json.loads(out.read_text())
    assert list(data["decode"]) == list(ba.DECODE_VARIANTS)
    for name in ("merged", "unmerged", "peft", "merged, optimize()", "unmerged, optimize()"):
        assert data["decode"][name]["same_ids_as_merged"], name
    assert len(data["mixed"]) == 6 and all(v["same_ids_as_eager"] for v in data["mixed"].values())
    assert all(t["median"] > 0 for t in data["operations"].values())
    assert all(v["decode_step_s"] >= 0 for v in data["decode"].values())
    # A fused column names the routes installed after optimize()'s whole-model check (which
    # may revert them on a machine where a run measured slower) and, where any, how many
    # decode steps they computed: all of them.
    for name in ("base, optimize()", "unmerged, optimize()"):
        route = data["decode"][name]["route"]
        if route.startswith("unchanged"):
            assert "(fast path ran" not in route, route
            continue
        ran = _ran(route)
        assert ran[0] == ran[1] > 0, route
    assert set(data["accuracy"]) >= {"base", "adapter", "task"}
    assert data["adapter_source"].startswith("saved adapter")
    assert out.with_suffix(".md").read_text().startswith("# bench.adapters")
    import pyperf

    suite = pyperf.BenchmarkSuite.load(str(inputs / "adapters-pyperf.json"))
    assert "adapters.decode.peft" in suite.get_benchmark_names()


@pytest.mark.gpu
def test_on_cuda_the_unmerged_adapter_runs_in_the_triton_decode_graph(inputs):
    out = inputs / "adapters-cuda.json"
    argv = ["--checkpoint", str(inputs / "ckpt"), "--adapter", str(inputs / "adapter")]
    argv += ["--repeat", "3", "--eval-samples", "4", "--new-tokens", "4", "--device", "cuda"]
    assert ba.main([*argv, "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    dec = data["decode"]
    for name in ("merged", "unmerged", "peft", "merged, optimize()", "unmerged, optimize()"):
        assert dec[name]["same_ids_as_merged"], name
    assert "triton_graph_decode" in dec["unmerged, optimize()"]["route"] or dec[
        "unmerged, optimize()"
    ]["route"].startswith("unchanged")
    for name in ("base, optimize()", "unmerged, optimize()"):
        route = dec[name]["route"]
        if not route.startswith("unchanged"):  # what the check kept ran every step
            ran = _ran(route)
            assert ran[0] == ran[1] > 0, route
    assert all(v["same_ids_as_eager"] for v in data["mixed"].values())


@pytest.mark.parametrize(
    "args, name",
    [
        (["--repeat", "2"], "--repeat"),
        (["--train-steps", "0"], "--train-steps"),
        pytest.param(
            ["--device", "cuda"],
            "--device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
        ),
    ],
)
def test_bad_arguments_name_the_argument(args, name, capsys):
    with pytest.raises(SystemExit):
        ba.main(args)
    assert name in capsys.readouterr().err
