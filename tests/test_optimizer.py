"""optimize() / KernelOptimizer: verified, timed kernel selection with honest fallbacks.

Backends here are test-only fakes (tests/optimizer/fakes.py): a wrong one, a slow one, and a
correct one that wins only because the test slows the baseline down (never faked timings).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import ryzen_opt
from ryzen_opt import KernelOptimizer, OptimizeConfig, optimize
from ryzen_opt.models.model import MLP, CausalSelfAttention
from ryzen_opt.optimization.modules import (
    FusedLinear,
    FusedMLP,
    OptimizedLayerNorm,
    OptimizedSelfAttention,
)
from tests.optimizer.fakes import (
    CountingLauncher,
    fast_config,
    one_thread,
    reference_attention,
    reference_layer_norm,
    reference_matmul,
    registered,
    slow_baselines,
    tiny_model,
)

PROMPT = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])


def _statuses(report, backend):
    return {
        c.status
        for s in report.sites
        for case in s.cases
        for c in case.candidates
        if c.backend == backend
    }


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """A tiny model optimized with correct fake backends against slowed baselines."""
    tmp = tmp_path_factory.mktemp("opt")
    mm = CountingLauncher(reference_matmul)
    at = CountingLauncher(reference_attention)
    ln = CountingLauncher(reference_layer_norm)
    with (
        registered("matmul", "fake_mm", mm),
        registered("attention", "fake_attn", at),
        registered("layer_norm", "fake_ln", ln),
    ):
        original = tiny_model()
        snapshot = copy.deepcopy(original.state_dict())
        # model_check=False: the win exists only against the slowed baseline, so the whole
        # model check (which times the real original) would rightly revert it.
        cfg = fast_config(tmp, backends=("fake_mm", "fake_attn", "fake_ln"), model_check=False)
        opt = KernelOptimizer(cfg)
        work = copy.deepcopy(original)
        plan = opt.plan(work)
        slow_baselines(plan)
        model = opt.apply(work, plan)
        yield {
            "original": original,
            "snapshot": snapshot,
            "model": model,
            "mm": mm,
            "at": at,
            "ln": ln,
            "report": opt.report,
        }


def test_optimize_name_is_the_function_not_the_subpackage():
    assert callable(ryzen_opt.optimize)
    assert ryzen_opt.optimize is optimize


def test_correct_fast_backends_are_kept_and_swapped_in(optimized):
    model, report = optimized["model"], optimized["report"]
    assert report.changed
    assert isinstance(model, type(optimized["original"]))
    block = model.blocks[0]
    assert isinstance(block.attn, OptimizedSelfAttention)
    assert isinstance(block.attn.qkv, FusedLinear) and isinstance(block.attn.proj, FusedLinear)
    assert isinstance(block.ln1, OptimizedLayerNorm) and isinstance(model.ln_f, OptimizedLayerNorm)
    assert isinstance(model.head, FusedLinear)
    chosen = {s.path: s.chosen for s in report.sites}
    assert chosen["blocks.0.attn.qkv"].get("prefill", "").startswith("fake_mm")
    assert chosen["blocks.0.attn"] == {"prefill": "fake_attn", "decode": "fake_attn"}
    best = next(s for s in report.sites if s.path == "head").best("decode")
    assert best.status == "faster" and best.ci[0] > 1.0 and best.rel_error <= 1e-4


def test_mlp_fc1_and_gelu_are_fused_into_one_kernel_call(optimized):
    mlp = optimized["model"].blocks[0].mlp
    assert isinstance(mlp, FusedMLP) and mlp.fc1.activation == "gelu"
    site = next(s for s in optimized["report"].sites if s.path == "blocks.0.mlp.fc1")
    assert site.detail.endswith("+gelu")
    mm = optimized["mm"]
    before = len(mm.activations)
    with torch.no_grad():
        optimized["model"](PROMPT[:1, :1])  # one row: inside the measured decode rows
    assert "gelu" in mm.activations[before:]


def test_generate_matches_original_greedy_and_uses_the_backends(optimized):
    original, model = optimized["original"], optimized["model"]
    calls = optimized["mm"].calls, optimized["at"].calls
    ref = original.generate(PROMPT, 10)
    out = model.generate(PROMPT, 10)
    assert torch.equal(out, ref)
    assert optimized["mm"].calls > calls[0] and optimized["at"].calls > calls[1]
    stream = torch.stack(list(model.generate_stream(PROMPT, 10)), dim=1)
    assert torch.equal(stream, ref[:, PROMPT.shape[1] :])


def test_calls_outside_the_measured_shapes_or_under_autograd_run_the_original(optimized):
    model, mm, at = optimized["model"], optimized["mm"], optimized["at"]
    calls = mm.calls, at.calls
    with torch.no_grad():
        model(torch.randint(0, 64, (3, 3)))  # 9 rows, batch 3: never measured
    model(PROMPT[:1, :1])  # grad enabled: backends have no backward, the original runs
    assert (mm.calls, at.calls) == calls


def test_state_dict_loads_both_ways(optimized):
    original, model = optimized["original"], optimized["model"]
    assert list(model.state_dict()) == list(original.state_dict())
    other = tiny_model(seed=1)
    model.load_state_dict(other.state_dict())  # original checkpoint -> optimized model
    with torch.no_grad():
        assert torch.allclose(model(PROMPT)[0], other(PROMPT)[0], rtol=1e-4, atol=1e-5)
    fresh = tiny_model(seed=2)
    fresh.load_state_dict(model.state_dict())  # optimized checkpoint -> original class
    with torch.no_grad():
        assert torch.equal(fresh(PROMPT)[0], other(PROMPT)[0])
    model.load_state_dict(original.state_dict())
    assert model.head.weight is model.tok_emb.weight  # the tie survives


def test_original_model_is_untouched(optimized):
    original = optimized["original"]
    assert type(original.blocks[0].attn) is CausalSelfAttention
    assert type(original.blocks[0].mlp) is MLP and type(original.head) is nn.Linear
    assert not hasattr(original, "optimization_report")
    for k, v in original.state_dict().items():
        assert torch.equal(v, optimized["snapshot"][k]), k


def test_report_json_markdown_and_rich(optimized, tmp_path):
    report = optimized["report"]
    path = tmp_path / "r.json"
    report.to_json(path)
    data = json.loads(path.read_text())
    assert data["changed"] is True
    site = next(s for s in data["sites"] if s["path"] == "blocks.0.attn")
    cand = site["cases"][0]["candidates"][0]
    assert {"backend", "status", "speedup", "ci", "rel_error", "max_abs_error"} <= set(cand)
    md = report.to_markdown()
    assert "| blocks.0.attn.qkv | linear |" in md and "speed-up" in md
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(report)
    assert "fake_mm" in console.export_text()


def test_wrong_backend_is_rejected_with_reason_error(tmp_path):
    model = tiny_model()
    with registered("matmul", "fake_wrong", CountingLauncher(reference_matmul, scale=1.01)):
        out = optimize(model, config=fast_config(tmp_path, backends=("fake_wrong",)))
    report = out.optimization_report
    assert _statuses(report, "fake_wrong") == {"error"}
    assert not report.changed and type(out.head) is nn.Linear
    rel = [c.rel_error for s in report.sites for k in s.cases for c in k.candidates]
    assert all(r > 1e-4 for r in rel)


def test_slow_backend_is_rejected_as_slower(tmp_path):
    model = tiny_model()
    slow = CountingLauncher(reference_matmul, sleep_s=2e-3)
    cfg = fast_config(tmp_path, backends=("fake_slow",), ops=("linear",))
    with registered("matmul", "fake_slow", slow):
        out = optimize(model, config=cfg)
    report = out.optimization_report
    assert _statuses(report, "fake_slow") == {"slower"}
    assert not report.changed and type(out.blocks[0].attn.qkv) is nn.Linear
    assert "slower" in report.to_markdown()


def test_no_backend_returns_unchanged_copy_and_says_so(tmp_path):
    model = tiny_model()
    out = optimize(model, config=fast_config(tmp_path, backends=()))
    assert out is not model and type(out) is type(model)
    assert [type(m) for m in out.modules()] == [type(m) for m in model.modules()]
    assert not out.optimization_report.changed
    assert out.optimization_report.summary.startswith("unchanged")


def test_inplace_optimizes_the_model_itself(tmp_path):
    model = tiny_model()
    out = optimize(model, config=fast_config(tmp_path, backends=()), inplace=True)
    assert out is model and hasattr(model, "optimization_report")


def test_decision_cache_is_written_then_reused(tmp_path):
    cfg = fast_config(tmp_path, backends=("fake_slow",), ops=("linear",))
    with registered("matmul", "fake_slow", CountingLauncher(reference_matmul, sleep_s=1e-3)):
        first = optimize(tiny_model(), config=cfg).optimization_report
        path = cfg.resolved_cache_dir / "decisions.json"
        entries = json.loads(path.read_text())["entries"]
        assert entries and all("speedup" in e for e in entries.values())
        second = optimize(tiny_model(), config=cfg).optimization_report
    cands = [c for s in second.sites for k in s.cases for c in k.candidates]
    assert cands and all(c.cached for c in cands)
    assert not any(
        c.cached for s in first.sites for k in s.cases for c in k.candidates if c is cands[0]
    )


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path):
    cfg = fast_config(tmp_path, backends=("fake_slow",), ops=("layer_norm",))
    path = cfg.resolved_cache_dir / "decisions.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with registered("layer_norm", "fake_slow", CountingLauncher(reference_layer_norm)):
        report = optimize(tiny_model(), config=cfg).optimization_report
    assert any("ignored and rebuilt" in n for n in report.notes)
    assert json.loads(path.read_text())["entries"]


def test_config_to_dict_and_tolerances():
    cfg = OptimizeConfig(backends=["numba"], tolerance={"bf16": 5e-3})
    d = cfg.to_dict()
    assert d["backends"] == ["numba"] and d["tolerance"]["bfloat16"] == 5e-3
    assert cfg.tolerance_for(torch.float32) == 1e-4
    assert cfg.tolerance_for(torch.float16) == 1e-2
    json.dumps(d)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RYZEN_OPT_CACHE_DIR", str(tmp_path / "env"))
    assert OptimizeConfig().resolved_cache_dir == tmp_path / "env"


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m: optimize("not a model"), "model"),
        (lambda m: optimize(m, dtype="float8"), "dtype"),
        (lambda m: optimize(m, dtype=torch.int32), "dtype"),
        (lambda m: optimize(m, device="tpu"), "device"),
        (lambda m: optimize(m, example_inputs=torch.randn(2, 4)), "example_inputs"),
        (lambda m: optimize(m, example_inputs=torch.tensor([1, 2])), "example_inputs"),
        (lambda m: optimize(m, example_inputs=torch.tensor([[1, 999]])), "example_inputs"),
        (lambda m: optimize(m, example_inputs=[[1, 2]]), "example_inputs"),
        (lambda m: optimize(nn.Linear(2, 2)), "example_inputs"),
        (lambda m: optimize(m, config={"repeat": 3}), "config"),
        (lambda m: optimize(m, inplace="yes"), "inplace"),
        (lambda m: KernelOptimizer("fast"), "config"),
        (lambda m: OptimizeConfig(repeat=1), "repeat"),
        (lambda m: OptimizeConfig(tolerance={"float32": 2.0}), "tolerance"),
        (lambda m: OptimizeConfig(ops=("conv",)), "ops"),
        (lambda m: OptimizeConfig(prefill_shape=(0, 4)), "prefill_shape"),
        (lambda m: optimize(m, config=OptimizeConfig(backends=("nope",))), "backends"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, name):
    with pytest.raises((TypeError, ValueError), match=name):
        call(tiny_model())


def test_cuda_device_without_gpu_raises_naming_device():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="device"):
        optimize(tiny_model(), device="cuda")


def test_example_inputs_give_the_measured_shapes(tmp_path):
    cfg = fast_config(tmp_path, backends=("fake_mm",), ops=("linear",))
    with registered("matmul", "fake_mm", CountingLauncher(reference_matmul)):
        opt = KernelOptimizer(cfg)
        plan = opt.plan(tiny_model(), torch.randint(0, 64, (3, 6)))
    shapes = {c.shape for s in plan.sites if s.path == "head" for c in s.cases}
    # The example's prefill and a decode step at its batch, and decode steps at the
    # configured batches (1 and 2), which generation runs too.
    assert shapes == {"3x6x32", "3x1x32", "1x1x32", "2x1x32"}


def test_rejections_name_a_faster_loser_and_what_beat_it():
    from ryzen_opt.optimization.report import (
        CandidateResult,
        CaseResult,
        SiteReport,
        _rejections,
    )

    site = SiteReport("(whole model)", "decode step", "fast path")
    for shape, (a, b) in (("1x1 after 32", (4.0, 9.0)), ("1x1 after 127", (3.5, 8.0))):
        case = CaseResult("decode b1", shape)
        case.candidates += [
            CandidateResult("graph_a", "decode_step", "faster", speedup=a),
            CandidateResult("graph_b", "decode_step", "faster", speedup=b),
            CandidateResult("numba", "decode_step", "unsupported", detail="runs on cpu"),
        ]
        site.cases.append(case)
    site.chosen["decode b1"] = "graph_b"
    text = _rejections(site, "decode b1")
    assert "graph_a: faster (>= 3.50x) but graph_b more so" in text
    assert "numba: unsupported (runs on cpu)" in text
    assert "graph_b" not in text.split(";")[0].split(":")[0]
    site.chosen.clear()  # nothing kept (e.g. the whole-model check reverted it)
    assert "graph_b: faster (>= 8.00x) but not kept" in _rejections(site, "decode b1")


def test_optimizer_error_metric_has_a_floor_for_cancelled_references():
    from ryzen_opt.optimization.engine import _rel_error

    # A reference that cancels to ~0 (one output, -8.7e-8) against a correct fp32 -0.0: the
    # plain ratio called this a relative error of 1.
    err, _ = _rel_error(torch.tensor([[-0.0]]), torch.tensor([[-8.7e-8]]), 1e-5)
    assert err <= 1e-5
    # An ordinary tensor keeps its relative scale: a 1e-3 perturbation still fails 1e-4.
    ref = torch.randn(64, 64)
    err, _ = _rel_error(ref * (1 + 1e-3), ref, 1e-4)
    assert err > 1e-4
    # A NaN where the reference is finite is an infinite error, not a zero.
    out = ref.clone()
    out[3, 5] = float("nan")
    assert _rel_error(out, ref, 1e-4)[0] == float("inf")


def test_the_check_reference_shares_weight_storage_but_not_parameters(tmp_path):
    from ryzen_opt.optimizer import weight_sharing_copy

    model = tiny_model()
    ref = weight_sharing_copy(model)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert p.data_ptr() == q.data_ptr(), name  # no second copy of the weights
        assert p is not q
    assert ref.head.weight is ref.tok_emb.weight  # ties survive
    # Rebinding the optimized model's Parameter (as the fused decode arena does) leaves the
    # reference on the original values.
    before = ref.head.weight.detach().clone()
    model.head.weight.data = torch.zeros_like(model.head.weight)
    assert torch.equal(ref.head.weight, before)
    plan = KernelOptimizer(fast_config(tmp_path)).plan(tiny_model())
    p0 = next(plan.model.parameters())
    assert next(plan.reference.parameters()).data_ptr() == p0.data_ptr()


def test_time_budget_leaves_unmeasured_sites_original_and_says_so(tmp_path):
    cfg = fast_config(tmp_path, backends=("fake_mm",), ops=("linear",), time_budget_s=1e-9)
    with registered("matmul", "fake_mm", CountingLauncher(reference_matmul)) as launcher:
        out = optimize(tiny_model(), config=cfg)
        sites = [s.path for s in KernelOptimizer(cfg).plan(tiny_model()).measured_sites()]
    report = out.optimization_report
    assert not report.changed and report.sites == []
    assert any("time budget of 1e-09 s" in n for n in report.notes), report.notes
    assert launcher.calls == 0  # nothing was run, let alone timed
    # the summary says the candidates were not measured, not that they lost
    skipped = report.not_measured()
    assert skipped == sites and len(sites) == 5  # qkv, proj, fc1, fc2, head
    assert report.summary.startswith("unchanged: no measured candidate")
    assert f"{len(skipped)} not measured within the time budget" in report.summary
    assert "raise OptimizeConfig.time_budget_s" in report.notes[-1]


def test_a_report_with_nothing_left_unmeasured_says_nothing_of_the_budget(tmp_path):
    cfg = fast_config(tmp_path, backends=("fake_mm",), ops=("linear",))
    with registered("matmul", "fake_mm", CountingLauncher(reference_matmul)):
        report = optimize(tiny_model(), config=cfg).optimization_report
    assert report.not_measured() == []
    assert "time budget" not in report.summary
    assert not any("not measured within the time budget" in n for n in report.notes)


def test_time_budget_and_progress_are_validated():
    for bad in (0, -1.0, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ValueError, match="time_budget_s"):
            OptimizeConfig(time_budget_s=bad)
    with pytest.raises(ValueError, match="progress"):
        OptimizeConfig(progress="yes")
    assert OptimizeConfig(time_budget_s=None).time_budget_s is None


def test_progress_bar_names_each_site_when_asked(tmp_path, monkeypatch):
    import rich.progress

    seen = []
    update = rich.progress.Progress.update

    def spy(self, task, **kw):
        seen.append(kw.get("description"))
        return update(self, task, **kw)

    monkeypatch.setattr(rich.progress.Progress, "update", spy)
    cfg = fast_config(tmp_path, backends=("fake_mm",), ops=("linear",), progress=True)
    with registered("matmul", "fake_mm", CountingLauncher(reference_matmul)):
        optimize(tiny_model(), config=cfg)
    assert "linear head" in seen and "whole-model fast paths" in seen, seen
    seen.clear()
    with registered("matmul", "fake_mm", CountingLauncher(reference_matmul)):
        optimize(tiny_model(), config=fast_config(tmp_path, backends=("fake_mm",)))
    assert seen == []  # off by default when standard error is not a terminal


def test_report_records_what_optimize_itself_cost(tmp_path):
    # The peak is resident-set growth, so what this process did before matters: a first
    # optimize() call imports modules (138 MiB measured when this test ran alone), so one runs
    # first on a tiny model.
    tiny = nn.Sequential(nn.Linear(8, 8)).eval()
    optimize(tiny, torch.randn(1, 8), config=fast_config(tmp_path, backends=()))
    # 32 MiB of weights. The working copy shares them, so optimize() costs far less than that.
    model = nn.Sequential(nn.Linear(2048, 4096)).eval()
    out = optimize(model, torch.randn(2, 2048), config=fast_config(tmp_path, backends=()))
    report = out.optimization_report
    assert report.peak_memory_bytes < 8 * 2**20, report.peak_memory_bytes
    assert report.elapsed_s > 0
    assert {"copy", "plan"} <= set(report.phases), report.phases
    assert sum(report.phases.values()) <= report.elapsed_s
    assert "optimize() took" in report.to_markdown() and "MiB" in report.cost
    assert report.cost in report.summary
    assert report.to_dict()["peak_memory_bytes"] == report.peak_memory_bytes
    assert report.to_dict()["phases"] == report.phases
    # Cast to bf16 the copy holds converted weights, and the peak shows them: 64 MiB from 128
    # MiB of fp32, one allocation above glibc's largest mmap threshold (32 MiB), so it comes
    # from fresh pages whatever earlier tests freed (a 16 MiB copy could reuse freed heap).
    big = nn.Sequential(nn.Linear(4096, 8192)).eval()
    x = torch.randn(2, 4096, dtype=torch.bfloat16)
    out = optimize(big, x, dtype="bf16", config=fast_config(tmp_path, backends=()))
    assert out.optimization_report.peak_memory_bytes >= 60 * 2**20
    assert big[0].weight.dtype == torch.float32  # the conversion was the copy's
