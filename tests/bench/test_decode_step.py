"""bench.decode_step: the eager step against each fast path, on the same inputs."""

import json

import pytest

from bench import decode_step as bd


def test_cpu_rows_for_both_numba_modes(tmp_path):
    out = tmp_path / "decode_step.json"
    assert bd.main(["--device", "cpu", "--batches", "2", "--repeat", "3", "-o", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == [
        "numba_fused_decode[serial]",
        "numba_fused_decode[pool]",
    ]
    for r in rows:
        assert r["batch"] == 2 and r["rel_error"] < 1e-4
        assert r["eager_s"] > 0 and r["call_s"] > 0 and r["kernel_s"] > 0
        assert r["call_speedup"][1] <= r["call_speedup"][0] <= r["call_speedup"][2]
    assert out.with_suffix(".md").read_text().startswith("# bench.decode_step")


@pytest.mark.parametrize(
    "args, name",
    [
        (["--batches", "0"], "--batches"),
        (["--batches", "a"], "--batches"),
        (["--past", "128"], "--past"),
        (["--repeat", "2"], "--repeat"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_name_the_argument(args, name, capsys):
    with pytest.raises(SystemExit):
        bd.main(["--device", "cpu", *args] if "--device" not in args else args)
    assert name in capsys.readouterr().err
