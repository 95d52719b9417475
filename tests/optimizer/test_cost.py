"""What optimize() itself costs: identical layers measured once, the weights shared with the
original (which stays as it was), a model-sized synthetic prefill, the time budget over every
phase, the peak memory, the progress bar over the decode-loop selection too."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

from ryzen_opt import KernelOptimizer, OptimizeConfig, optimize
from ryzen_opt.kernels.reference import error_floor, relative_error
from ryzen_opt.optimization.config import DEFAULT_PREFILL_SHAPE
from ryzen_opt.optimization.engine import check_cost_s, weight_sharing_copy
from ryzen_opt.optimization.modules import FusedLinear, OptimizedLayerNorm
from ryzen_opt.optimization.sites import Run
from tests.optimizer.fakes import (
    CountingLauncher,
    fast_config,
    one_thread,
    reference_layer_norm,
    reference_matmul,
    registered,
    slow_baselines,
    tiny_model,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _llama(layers=2, hidden=32, inter=64, vocab=64, seed=0, max_pos=64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    model.generation_config.pad_token_id = 0
    return model.eval()


# ----------------------------------------------------------------------------- memory


def test_peak_memory_of_optimize_stays_below_one_and_a_half_times_the_weights(tmp_path):
    # First in this file: after the Numba decode loop and kernels have run in this process,
    # the same optimize() took up to 7x longer on 2 shared cores.
    # 100 MB of fp32 weights (a 1024-wide, 4-layer Llama with a 4096-word untied head):
    # before the weights were shared, the working copy alone cost 1x, the packed weight
    # copies of every Linear site another 1x.
    model = _llama(layers=4, hidden=1024, inter=2048, vocab=4096, max_pos=256)
    weights = _weight_bytes(model)
    assert weights > 90 * 2**20
    cfg = OptimizeConfig(
        use_cache=False,
        repeat=3,
        warmup=1,
        min_sample_s=1e-3,
        decode_batches=(1,),
        decode_tokens=4,
        fast_paths=("torch_static_decode",),
        backends=("fake_mm",),
        cache_dir=tmp_path,
        time_budget_s=None,
    )
    with registered("matmul", "fake_mm", CountingLauncher(reference_matmul)) as mm:
        out = optimize(model, config=cfg)
    rep = out.optimization_report
    assert mm.calls > 0  # the sites were measured
    assert rep.peak_memory_bytes is not None
    assert rep.peak_memory_bytes < 1.5 * weights, (rep.peak_memory_bytes / weights, rep.cost)
    assert rep.cost in rep.summary and "MiB" in rep.summary


# ----------------------------------------------------------------------------- reuse


def _optimized_stm(tmp_path, layers: int):
    """A seed model of ``layers`` identical blocks, fake linear/LN backends that win against
    slowed baselines; returns (model, report, matmul launcher, plan)."""
    mm = CountingLauncher(reference_matmul)
    ln = CountingLauncher(reference_layer_norm)
    with registered("matmul", "fake_mm", mm), registered("layer_norm", "fake_ln", ln):
        # model_check=False: the win exists only against the slowed baselines.
        cfg = fast_config(
            tmp_path,
            backends=("fake_mm", "fake_ln"),
            ops=("linear", "layer_norm"),
            model_check=False,
        )
        opt = KernelOptimizer(cfg)
        work = tiny_model(num_layers=layers)
        plan = opt.plan(work)
        slow_baselines(plan)
        measured = [s.path for s in plan.sites if s.reuse_of is None]
        model = opt.apply(work, plan)
    return model, opt.report, mm, measured


def test_identical_layers_are_measured_once_and_every_layer_gets_the_decision(
    tmp_path, monkeypatch
):
    from ryzen_opt.optimization.engine import Engine

    evaluated = []
    evaluate = Engine.evaluate

    def spy(self, cand, case, ref, site):
        evaluated.append(site.path)
        return evaluate(self, cand, case, ref, site)

    monkeypatch.setattr(Engine, "evaluate", spy)
    _, _, _, measured1 = _optimized_stm(tmp_path / "one", 1)
    one, evaluated[:] = list(evaluated), []
    model, report, _, measured3 = _optimized_stm(tmp_path / "three", 3)
    # One measurement: the same sites are measured for 3 blocks as for 1 (block 0's), with
    # the same candidates; nothing was verified or timed for blocks 1 and 2.
    assert measured3 == measured1
    assert evaluated == one
    assert not any(p.startswith(("blocks.1.", "blocks.2.")) for p in evaluated)
    # n reports: every block's sites are in the report, blocks 1-2 with block 0's decision.
    by_path = {s.path: s for s in report.sites}
    for i in (1, 2):
        for name in ("attn.qkv", "attn.proj", "mlp.fc2", "ln1", "ln2"):
            site = by_path[f"blocks.{i}.{name}"]
            first = "ln1" if name.startswith("ln") else name  # ln1 and ln2: one signature
            src = by_path[f"blocks.0.{first}"]
            assert site.note == f"reused from blocks.0.{first}", site.note
            assert site.chosen == src.chosen and site.chosen
            assert site.cases == src.cases
        block = model.blocks[i]
        assert isinstance(block.attn.qkv, FusedLinear) and block.attn.qkv.routes
        assert isinstance(block.ln1, OptimizedLayerNorm) and block.ln1.routes
    # ln1, ln2 of block 0 and ln_f share one signature: ln_f reuses ln1's decision too.
    assert by_path["ln_f"].note == "reused from blocks.0.ln1"
    assert "reused from blocks.0.attn.qkv" in report.to_markdown()


def test_sites_differing_in_weight_shape_or_inputs_are_measured_apart(tmp_path):
    cfg = fast_config(tmp_path, backends=("fake_mm",), ops=("linear",))
    with registered("matmul", "fake_mm", CountingLauncher(reference_matmul)):
        plan = KernelOptimizer(cfg).plan(_llama(layers=3))
    sig = {s.path: s for s in plan.sites}
    # q and o: Linear 32->32 without bias, fed (2, 8, 32) / (1, 1, 32): one signature.
    assert sig["model.layers.1.self_attn.q_proj"].reuse_of == "model.layers.0.self_attn.q_proj"
    assert sig["model.layers.0.self_attn.o_proj"].reuse_of == "model.layers.0.self_attn.q_proj"
    # k (32->16) and v (32->16) share one; gate/up (32->64) one; down (64->32) another.
    assert sig["model.layers.0.self_attn.v_proj"].reuse_of == "model.layers.0.self_attn.k_proj"
    assert sig["model.layers.0.mlp.up_proj"].reuse_of == "model.layers.0.mlp.gate_proj"
    assert sig["model.layers.2.mlp.down_proj"].reuse_of == "model.layers.0.mlp.down_proj"
    assert sig["model.layers.0.mlp.down_proj"].reuse_of is None
    # lm_head has gate's weight shape (64 x 32) but is fed the last position only.
    assert sig["lm_head"].reuse_of is None
    reps = [s.path for s in plan.sites if s.reuse_of is None]
    assert len(reps) == 5, reps  # q/o, k/v, gate/up, down, lm_head
    assert all(s.cases for s in plan.sites if s.reuse_of is None)
    assert not any(s.cases for s in plan.sites if s.reuse_of)


# ----------------------------------------------------------------------------- sharing


def test_the_original_keeps_its_values_and_the_copy_its_checkpoint_keys(tmp_path):
    original = _llama(layers=2)
    snapshot = copy.deepcopy(original.state_dict())
    cfg = OptimizeConfig(
        use_cache=False,
        repeat=3,
        warmup=1,
        decode_batches=(1,),
        prefill_shape=(2, 8),
        fast_paths=("torch_static_decode", "numba_decoder[fp32]"),
        cache_dir=tmp_path,
    )
    fast = optimize(original, config=cfg)
    assert fast is not original
    ids = torch.randint(1, 64, (1, 6))
    with torch.no_grad():
        fast(ids)
        fast.generate(ids, max_new_tokens=5, do_sample=False)
    after = original.state_dict()
    assert after.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(after[k], v), k
    # The checkpoint keys of the optimized model are the original's.
    assert fast.state_dict().keys() == snapshot.keys()
    # The weights are shared, not copied (documented: in-place edits show in both) ...
    assert fast.lm_head.weight.data_ptr() == original.lm_head.weight.data_ptr()
    assert fast.lm_head.weight is not original.lm_head.weight
    # ... and rebinding one model's Parameter leaves the other's as it was.
    fast.lm_head.weight = torch.nn.Parameter(torch.zeros_like(fast.lm_head.weight))
    assert torch.equal(original.lm_head.weight, snapshot["lm_head.weight"])


def test_weight_sharing_copy_shares_parameters_and_buffers_keeps_ties():
    model = _llama(layers=1)
    model.lm_head.weight = model.model.embed_tokens.weight  # tie
    twin = weight_sharing_copy(model)
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert p is not q and p.data_ptr() == q.data_ptr(), n
    for (n, b), (_, c) in zip(model.named_buffers(), twin.named_buffers(), strict=True):
        assert b is not c and b.data_ptr() == c.data_ptr(), n
    assert twin.config is not model.config
    twin.to(torch.float64)  # converting one model converts that one only
    assert model.lm_head.weight.dtype == torch.float32


# ----------------------------------------------------------------------------- shapes


def test_the_synthetic_prefill_is_sized_to_the_model():
    cfg = OptimizeConfig()
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    # The seed model (1.6M parameters) and small models keep 16 x 128.
    assert cfg.prefill_shape_for(1_611_776, cpu) == DEFAULT_PREFILL_SHAPE
    # Qwen2-0.5B's 494M parameters on the CPU: 16 tokens; GPT-2 small's 124M: 64.
    assert cfg.prefill_shape_for(494_032_768, cpu) == (1, 16)
    assert cfg.prefill_shape_for(124_439_808, cpu) == (1, 64)
    assert cfg.prefill_shape_for(494_032_768, gpu) == DEFAULT_PREFILL_SHAPE
    # Logits of every position (no logits_to_keep) of a 152k vocabulary: bounded by memory.
    b, t = cfg.prefill_shape_for(
        1_000_000, gpu, logit_row_bytes=151936 * 4, last_logits_only=False, weight_bytes=4e6
    )
    assert b * t * 151936 * 4 <= 64 * 2**20 and (b, t) != DEFAULT_PREFILL_SHAPE
    # A shape set by the user is used as it is.
    assert OptimizeConfig(prefill_shape=(3, 5)).prefill_shape_for(494_032_768, cpu) == (3, 5)


def test_the_plan_uses_the_model_sized_prefill(tmp_path, monkeypatch):
    from ryzen_opt.optimization import config as config_mod

    # Pretend the CPU can afford only 8 tokens of this model: the prefill shrinks.
    monkeypatch.setattr(config_mod, "CPU_PREFILL_WORK", 8 * 30_000)
    model = _llama(layers=1)
    n = sum(p.numel() for p in model.parameters())
    assert 8 * n <= 8 * 30_000 * 1.5
    plan = KernelOptimizer(OptimizeConfig(use_cache=False, cache_dir=tmp_path)).plan(model)
    assert plan.prefill_shape == (1, 16)
    assert plan.runs[0].label == "prefill" and plan.runs[0].shape == "1x16"
    assert all(r.call_s > 0 for r in plan.runs)


def test_a_long_captured_call_is_not_run_a_second_time(monkeypatch):
    """The capture times each run's call twice (a first call can be 20x a warm one), but a
    call of WARM_CALL_S or more only once: its one-off costs are a small part of it."""
    import torch.nn as nn

    from ryzen_opt.optimization import sites
    from ryzen_opt.optimization.sites import Run, capture

    calls = {"short": 0, "long": 0}

    def call(label, seconds):
        def run(m, s):
            calls[label] += 1
            time.sleep(seconds)

        return run

    runs = [
        Run("short", "1", lambda m: None, call("short", 0.01)),
        Run("long", "1", lambda m: None, call("long", 0.05)),
    ]
    monkeypatch.setattr(sites, "WARM_CALL_S", 0.03)
    capture(nn.Linear(2, 2), runs, {}, hf_on=False)
    assert calls == {"short": 2, "long": 1}
    assert runs[1].call_s >= 0.05 and 0 < runs[0].call_s < 0.03
    # On a GPU a long first call is mostly set-up (libraries, compiles): timed again.
    monkeypatch.setattr(sites, "_sync", lambda device: None)
    calls.update(short=0, long=0)
    capture(nn.Linear(2, 2), runs, {}, hf_on=False, device=torch.device("cuda"))
    assert calls == {"short": 2, "long": 2}


def _forwards(model):
    """Input shapes of every whole-model forward, as a list the hook appends to."""
    shapes = []
    model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    return shapes


def test_the_decode_run_on_the_example_rows_takes_the_prefill_cache(tmp_path):
    """With an example of 4 rows, the decode run at batch 4 is set up on the same rows as
    the prefill run: the capture hands it the prefill's cache instead of running that
    forward again, and books the prefill's time as its set-up time (the check, which runs
    every set-up itself, pays it)."""
    from ryzen_opt.optimization.sites import capture, hf_runs

    model = _llama(layers=1)
    ids = torch.randint(1, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    cfg = OptimizeConfig(use_cache=False, cache_dir=tmp_path, decode_batches=(1,))
    runs = hf_runs(model, {"input_ids": ids}, cfg, torch.device("cpu"))
    assert [r.shape for r in runs] == ["input_ids=4x10", "1x1 after 10", "4x1 after 10"]
    shapes = _forwards(model)
    capture(model, runs, {}, hf_on=False)
    # prefill (twice: a short call is timed again), decode b1 set-up and 2 calls, and
    # the decode b4 calls: no second 4 x 10 forward for the b4 set-up.
    assert shapes.count((4, 10)) == 2
    assert shapes.count((1, 10)) == 1 and shapes.count((4, 1)) == 2
    assert runs[2].setup_s == runs[0].shared.source_s > 0
    assert runs[1].shared is None and runs[2].shared is runs[0].shared
    # Outside the capture the set-up runs its own forward, and both give the same step.
    shapes.clear()
    with torch.no_grad():
        own = runs[2].call(model, runs[2].setup(model))
    assert shapes == [(4, 10), (4, 1)]
    share = runs[0].shared
    share.armed = True
    with torch.no_grad():
        runs[0].call(model, runs[0].setup(model))
        handed = runs[2].call(model, runs[2].setup(model))
    assert torch.equal(own, handed)
    # A cache is only handed to the model that made it.
    with torch.no_grad():
        runs[0].call(model, runs[0].setup(model))
    assert share.take(_llama(layers=1)) is None and share.take(model) is None
    share.disarm()


def test_an_example_with_its_own_cache_shares_nothing(tmp_path):
    """An example that brings a KV cache: the prefill extends that cache, so no run is
    handed it (every set-up runs its own forward, as before)."""
    from ryzen_opt.optimization.sites import hf_runs

    model = _llama(layers=1)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    cfg = OptimizeConfig(use_cache=False, cache_dir=tmp_path, decode_batches=(1,))
    example = {"input_ids": ids[:, -1:], "past_key_values": cache}
    runs = hf_runs(model, example, cfg, torch.device("cpu"))
    assert runs and all(r.shared is None for r in runs)


# ----------------------------------------------------------------------------- budget


def test_the_check_estimate_counts_every_run_and_the_timed_ones():
    cfg = OptimizeConfig(repeat=10, warmup=2, min_sample_s=1e-3)
    runs = [
        Run("prefill", "2x8", None, None, setup_s=0.0, call_s=0.5),
        Run("decode", "1x1 after 2", None, None, setup_s=0.1, call_s=0.01),
        Run("decode", "1x1 after 7", None, None, setup_s=0.2, call_s=0.02),
    ]
    # all runs twice; one timed run per label and batch: 2 x (warmup + 1 + repeat) calls
    want = 2 * (0.5 + 0.11 + 0.22) + 2 * 13 * (0.5 + 0.02)
    assert math.isclose(check_cost_s(cfg, runs), want)


def test_the_time_budget_bounds_all_of_optimize(tmp_path):
    model = _llama(layers=2)
    base = dict(use_cache=False, repeat=20, cache_dir=tmp_path, decode_batches=(1, 4))
    budget = 4.0
    t0 = time.perf_counter()
    out = optimize(model, config=OptimizeConfig(time_budget_s=budget, **base))
    wall = time.perf_counter() - t0
    rep = out.optimization_report
    # The budget was binding: something was left unmeasured, and the report says so.
    said = " ".join(rep.notes) + " ".join(s.note for s in rep.sites)
    details = [c.detail for s in rep.sites for k in s.cases for c in k.candidates]
    assert "time budget" in said or any("time budget" in d for d in details), said
    assert rep.not_measured() and "not measured within the time budget" in rep.summary
    # One step may run past the line by its own (estimated) length, not more.
    assert rep.elapsed_s <= budget + 3.0, rep.phases
    assert wall <= budget + 3.5
    assert sum(rep.phases.values()) <= rep.elapsed_s + 1e-6


def test_a_check_that_does_not_fit_reverts_the_swaps(tmp_path, monkeypatch):
    from ryzen_opt import optimizer as optimizer_mod

    # Per-op swaps that win (slowed baselines), and a whole-model check estimated far above
    # what is left: the swaps are undone rather than shipped unchecked.
    monkeypatch.setattr(optimizer_mod, "check_cost_s", lambda cfg, runs: 1e6)
    mm = CountingLauncher(reference_matmul)
    with registered("matmul", "fake_mm", mm):
        cfg = fast_config(tmp_path, backends=("fake_mm",), ops=("linear",), time_budget_s=30.0)
        opt = KernelOptimizer(cfg)
        work = tiny_model()
        plan = opt.plan(work)
        slow_baselines(plan)
        model = opt.apply(work, plan)
    rep = opt.report
    assert not rep.changed and not rep.model_checks
    assert not any(isinstance(m, FusedLinear) for m in model.modules())
    assert any("kept for the whole-model check" in n for n in rep.notes), rep.notes
    assert mm.calls == 0


# ----------------------------------------------------------------------------- progress


def test_the_progress_bar_covers_the_decode_loop_selection(tmp_path, monkeypatch, capsys):
    import rich.progress

    seen, totals = [], []
    update, add_task = rich.progress.Progress.update, rich.progress.Progress.add_task

    def spy(self, task, **kw):
        seen.append(kw.get("description"))
        return update(self, task, **kw)

    def spy_add(self, *a, **kw):
        totals.append(kw.get("total"))
        return add_task(self, *a, **kw)

    monkeypatch.setattr(rich.progress.Progress, "update", spy)
    monkeypatch.setattr(rich.progress.Progress, "add_task", spy_add)
    cfg = OptimizeConfig(
        use_cache=False,
        repeat=3,
        warmup=1,
        decode_batches=(1,),
        prefill_shape=(1, 8),
        fast_paths=("torch_static_decode",),
        backends=(),
        progress=True,
        cache_dir=tmp_path,
    )
    capsys.readouterr()
    optimize(_llama(layers=1), config=cfg)
    assert "generate b1: torch_static_decode" in seen, seen
    assert "whole-model check" in seen, seen
    assert totals == [3]  # one decode-loop step, no site (no backend), fast paths, check
    # Standard error is no terminal here: asked for, the steps are printed as lines.
    err = capsys.readouterr().err
    assert "optimize() 0/3" in err and "generate b1: torch_static_decode" in err, err
    assert "optimize() 2/3" in err and "whole-model check" in err, err


# ----------------------------------------------------------------------------- logits


def test_step_by_step_error_equals_the_error_of_the_stacked_steps():
    from ryzen_opt.optimization import families
    from ryzen_opt.optimization.fastpaths.hf_select import StepError

    lay = families.find(_llama(layers=1))[0].layout(_llama(layers=1))
    g = torch.Generator().manual_seed(0)
    refs = [torch.randn(3, 64, generator=g) for _ in range(5)]
    outs = [r + 1e-3 * torch.randn(3, 64, generator=g) for r in refs]
    acc = StepError(lay, 1e-4)
    for o, r in zip(outs, refs, strict=True):
        acc.add(o, r)
    out, ref = torch.stack(outs, 1), torch.stack(refs, 1)
    want = relative_error(out, ref, error_floor(torch.float32, 1e-4, out.numel(), lay.hidden))
    assert math.isclose(acc.value, want, rel_tol=1e-9)
    assert math.isclose(acc.max_abs, float((out - ref).abs().max()), rel_tol=1e-6)
    outs[2] = outs[2].clone()
    outs[2][0, 0] = float("nan")
    bad = StepError(lay, 1e-4)
    for o, r in zip(outs, refs, strict=True):
        bad.add(o, r)
    assert bad.value == math.inf


def test_decode_loop_prompts_never_hold_an_unmasked_pad_token():
    from ryzen_opt.optimization import families
    from ryzen_opt.optimization.fastpaths import hf_select

    # A random prompt that drew the pad id made generate() infer a mask the paths' checks
    # did not use: every path failed as "error" on small vocabularies.
    model = _llama(layers=1, vocab=8)  # pad_token_id 0
    lay = families.find(model)[0].layout(model)
    cfg = OptimizeConfig(decode_batches=(1, 3))
    for b, kw in hf_select.prompts(model, lay, None, cfg, prompt_len=40):
        assert not bool((kw["input_ids"] == 0).any()) and "attention_mask" not in kw
        assert kw["input_ids"].shape == (b, 40) and int(kw["input_ids"].max()) < 8
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    (_, kw1), (_, kw2) = hf_select.prompts(model, lay, {"input_ids": ids}, cfg)[:2]
    assert torch.equal(kw1["attention_mask"], (ids[:1] != 0).long())
    assert kw2["attention_mask"].shape == (2, 4)
    # The context leaves room for the generated tokens.
    short = _llama(layers=1, max_pos=20)
    lay = families.find(short)[0].layout(short)
    (_, kw), *_ = hf_select.prompts(short, lay, None, cfg, prompt_len=64)
    assert kw["input_ids"].shape[1] == 20 - cfg.decode_tokens
