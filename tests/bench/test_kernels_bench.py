"""bench.kernels: every case builds, probes and checks on this machine (no timing here)."""

import pytest
import torch

from bench import kernels


@pytest.mark.parametrize("quick", [True, False])
def test_every_cpu_case_probes_and_its_baseline_runs_on_small_inputs(quick):
    names = set()
    for case in kernels.cases("cpu", quick):
        probe = case.make("probe:cpu")
        assert all(not isinstance(t, torch.Tensor) or t.device.type == "cpu" for t in probe)
        for name, _fn, reason in kernels.candidates(case, "cpu", probe):
            assert reason is None or isinstance(reason, str), (name, reason)
        names.add(kernels._bench_name(case, "torch", "cpu"))
    assert len(names) == len(kernels.cases("cpu", quick))  # benchmark names are unique


def test_cuda_case_list_is_well_formed_without_a_gpu():
    cs = kernels.cases("cuda", quick=False)
    assert {c.op for c in cs} >= {"matmul", "attention", "decode_attention", "layer_norm"}
    assert all(c.dtype == torch.bfloat16 for c in cs if c.op != "ceiling")


def test_baseline_and_reference_agree_on_a_model_shape_case():
    from ryzen_opt.kernels import reference

    case = next(c for c in kernels.cases("cpu", True) if "gelu" in c.label)
    args = case.make("cpu")
    out = reference.matmul(*args)
    assert kernels._rel_error(out, case.torch_fn(*args)) < 1e-5


def test_every_cpu_case_runs_through_the_reference_op_and_matches_torch():
    from ryzen_opt.kernels import registry

    for case in kernels.cases("cpu", quick=False):
        if case.op == "ceiling" or case.flops > 4e9:
            continue
        args = case.make("cpu")
        out = registry.dispatch(case.op, "reference", *args)
        assert kernels._rel_error(out, case.torch_fn(*args)) < 1e-4, case.label


def test_only_filter_keeps_the_matching_cases():
    all_cases = kernels.cases("cpu", quick=False)
    assert kernels.select(all_cases, None) == all_cases
    picked = kernels.select(all_cases, ["decode"])
    labels = {f"{c.op} {c.label}" for c in picked}
    assert labels and all("decode" in x for x in labels)
    assert any(c.op == "decode_attention" for c in picked)
    assert any(c.op == "matmul" for c in picked)  # "decode qkv" matmul cases
    assert kernels.select(all_cases, ["no such case"]) == []
    assert len(kernels.select(all_cases, ["cache128", "cache4096"])) == 4
