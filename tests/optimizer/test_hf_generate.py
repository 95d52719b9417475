"""The installed ``generate`` of an HF decoder: HF's results through the fast decode loop."""

from __future__ import annotations

import copy

import pytest
import torch

from ryzen_opt.optimization import families
from ryzen_opt.optimization.fastpaths import generate as fgen
from tests.optimizer.hf_models import left_padded, tiny

FAMILIES = ["llama", "qwen2", "gpt2"]
CPU_PATHS = ["torch_static_decode", "numba_decoder[fp32]"]


def _fast(model, path="torch_static_decode", lo=1, hi=64):
    fam, why = families.find(model)
    assert why is None
    fgen.install(model, fam.layout(model), [(lo, hi, path)])
    return model


def _original(model):
    return type(model).generate.__get__(model)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_the_original_with_left_padding(family, path):
    model = _fast(tiny(family), path)
    ids, mask = left_padded(3, 9, [0, 3, 6])
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = _original(model)(ids, **kw)
    out = model.generate(ids, **kw)
    assert model.generate.last_route == path
    assert torch.equal(out, ref)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eos_stops_each_row_and_pads_it(family, path):
    model = _fast(tiny(family), path)
    ids, mask = left_padded(2, 6, [0, 2])
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    free = _original(model)(ids, **kw)
    # an eos that row 0 emits early: row 0 stops and is padded, row 1 runs on
    eos = int(free[0, 6 + 2])
    ref = _original(model)(ids, eos_token_id=eos, **kw)
    out = model.generate(ids, eos_token_id=eos, **kw)
    assert model.generate.last_route == path
    assert torch.equal(out, ref)
    # every row finished: the output is shorter than max_new_tokens, as HF's is
    both = [int(free[0, 6 + 1]), int(free[1, 6 + 1])]
    ref = _original(model)(ids, eos_token_id=both, **kw)
    out = model.generate(ids, eos_token_id=both, **kw)
    assert out.shape[1] < 6 + 20 and torch.equal(out, ref)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sampling_draws_the_same_stream(family, path):
    model = _fast(tiny(family), path)
    ids, mask = left_padded(2, 5, [0, 1])
    kw = dict(
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=True,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        pad_token_id=0,
    )
    torch.manual_seed(5)
    ref = _original(model)(ids, **kw)
    torch.manual_seed(5)
    out = model.generate(ids, **kw)
    assert model.generate.last_route == path
    assert torch.equal(out, ref)


@pytest.mark.parametrize("model_top_k", [None, 7])
def test_sampling_with_unset_settings_uses_the_defaults_generate_uses(model_top_k):
    # transformers 5 stores unset settings as None and fills them inside generate() (the
    # model's generation config first, then top_k=50 and the rest); 4.x stores the defaults.
    model = _fast(tiny("llama"))
    if model_top_k is not None:
        model.generation_config.top_k = model_top_k
    cfg, reason = model.generate._settings(None, {"do_sample": True, "max_new_tokens": 4})
    assert reason is None
    assert cfg.top_k == (model_top_k or 50) and cfg.max_new_tokens == 4
    ids, mask = left_padded(2, 5, [0, 2])
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, pad_token_id=0)
    torch.manual_seed(3)
    ref = _original(model)(ids, **kw)
    torch.manual_seed(3)
    out = model.generate(ids, **kw)
    assert model.generate.last_route == "torch_static_decode"
    assert torch.equal(out, ref)


def test_unimplemented_settings_go_to_the_original():
    model = _fast(tiny("llama"))
    ids, mask = left_padded(1, 5, [0])
    kw = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    ref = _original(model)(ids, num_beams=2, **kw)
    out = model.generate(ids, num_beams=2, **kw)
    assert torch.equal(out, ref)
    assert "num_beams" in model.generate.last_route
    model.generate(ids, repetition_penalty=1.3, **kw)
    assert "repetition_penalty" in model.generate.last_route


def test_batches_outside_the_routes_and_right_padding_go_to_the_original():
    model = _fast(tiny("llama"), lo=1, hi=2)
    ids, mask = left_padded(3, 5, [0, 0, 0])
    model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)
    assert "batch 3" in model.generate.last_route
    ids, mask = ids[:2], mask[:2].clone()
    mask[1, -1] = 0
    model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)
    assert "left padding" in model.generate.last_route


def test_state_dict_class_and_copies_are_unchanged():
    model = tiny("qwen2")
    keys = list(model.state_dict())
    cls = type(model)
    _fast(model)
    assert type(model) is cls and list(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    ids, mask = left_padded(1, 5, [0])
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(twin.generate(ids, **kw), model.generate(ids, **kw))
    assert twin.generate.model is twin


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_optimize_installs_a_measured_decode_path(family):
    from ryzen_opt import OptimizeConfig, optimize

    model = tiny(family)
    ids, mask = left_padded(2, 8, [0, 3])
    cfg = OptimizeConfig(use_cache=False, repeat=4, warmup=1, decode_batches=(1, 2))
    fast = optimize(model, example_inputs={"input_ids": ids, "attention_mask": mask}, config=cfg)
    site = next(s for s in fast.optimization_report.sites if s.kind == "generate")
    cases = {c.case: c for c in site.cases}
    assert set(cases) == {"decode b1", "decode b2"}
    for case in cases.values():
        res = next(c for c in case.candidates if c.backend == "torch_static_decode")
        assert res.status in ("faster", "slower"), res.detail
        assert res.rel_error is not None and res.rel_error <= 1e-4
        assert res.speedup is not None and "equal to the original" in res.detail
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(ids, **kw), _original(model)(ids, **kw))
    if site.chosen:
        assert isinstance(fast.__dict__.get("generate"), fgen.FastGenerate)
        assert "generate() runs the fast decode loop (b" in fast.optimization_report.summary
    # the caller's model is untouched
    assert "generate" not in model.__dict__


def test_a_refused_family_is_named_in_the_report():
    from ryzen_opt import OptimizeConfig, optimize

    model = tiny("gpt2", activation_function="relu")
    ids, _ = left_padded(1, 8, [0])
    fast = optimize(model, example_inputs=ids, config=OptimizeConfig(use_cache=False, repeat=3))
    notes = " ".join(fast.optimization_report.notes)
    assert "gpt2 decode paths: not used: activation_function" in notes


GPU_PATHS = ["cuda_graph_decode", "triton_graph_decode"]


@pytest.mark.gpu
@pytest.mark.parametrize("path", GPU_PATHS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_paths_generate_like_the_original(family, path, dtype):
    from ryzen_opt.optimization.fastpaths import decoder

    model = tiny(family, dtype=dtype).cuda()
    fam = families.find(model)[0]
    reason = decoder.why_not(path, fam.layout(model))
    if reason is not None:
        pytest.skip(reason)
    fgen.install(model, fam.layout(model), [(1, 64, path)])
    ids, mask = left_padded(3, 9, [0, 3, 6])
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0)
    ref = _original(model)(ids, **kw)
    out = model.generate(ids, **kw)
    assert model.generate.last_route == path
    # the first call captured the graphs; a replayed call must give the same tokens
    assert torch.equal(
        model.generate(ids, **{**kw, "min_new_tokens": 40, "eos_token_id": 1}),
        model.generate(ids, **{**kw, "min_new_tokens": 40, "eos_token_id": 1}),
    )
    if dtype == torch.float32:
        assert torch.equal(out, ref)
    else:  # bf16 near-ties may flip a token; the logits check is the hf_select test's
        assert (out == ref).float().mean() > 0.9
    # eos per row inside the graph loop, and a second call reusing the captured graph
    eos = int(ref[0, 9 + 3])
    for extra in ({}, {"min_new_tokens": 6}):
        ref = _original(model)(ids, eos_token_id=eos, **kw, **extra)
        out = model.generate(ids, eos_token_id=eos, **kw, **extra)
        assert model.generate.last_route == path
        if dtype == torch.float32:
            assert torch.equal(out, ref), extra
    torch.manual_seed(3)
    ref = _original(model)(ids, **{**kw, "do_sample": True, "top_k": 10})
    torch.manual_seed(3)
    out = model.generate(ids, **{**kw, "do_sample": True, "top_k": 10})
    if dtype == torch.float32:
        assert torch.equal(out, ref)


def test_settings_stored_at_their_neutral_values_keep_the_fast_path():
    model = _fast(tiny("llama"))
    gc = model.generation_config
    gc.output_attentions, gc.output_hidden_states, gc.num_beams = False, False, 1
    gc.repetition_penalty = 1.0
    ids, mask = left_padded(1, 5, [0])
    model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)
    assert model.generate.last_route == "torch_static_decode"
    model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=3,
        pad_token_id=0,
        output_hidden_states=True,
        return_dict_in_generate=True,
    )
    assert "output_hidden_states" in model.generate.last_route


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("do_sample", [False, True])
def test_min_new_tokens_holds_eos_back_as_the_original_does(do_sample, path):
    model = _fast(tiny("llama"), path)
    ids, mask = left_padded(2, 6, [0, 2])
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=do_sample, pad_token_id=0)
    torch.manual_seed(0)
    free = _original(model)(ids, **kw)
    eos = [int(free[0, 6 + 1]), int(free[1, 6 + 2])]  # both would stop early without min
    for extra in ({"min_new_tokens": 8}, {"min_length": 6 + 5}):
        torch.manual_seed(1)
        ref = _original(model)(ids, eos_token_id=eos, **kw, **extra)
        torch.manual_seed(1)
        out = model.generate(ids, eos_token_id=eos, **kw, **extra)
        assert model.generate.last_route == path
        assert torch.equal(out, ref), extra


def test_bf16_paths_are_judged_against_float32_like_the_model():
    from ryzen_opt.optimization.fastpaths import hf_select

    model = tiny("llama", dtype=torch.bfloat16)
    lay = families.find(model)[0].layout(model)
    ids, mask = left_padded(2, 6, [0, 2])
    kw = {"input_ids": ids, "attention_mask": mask}
    ref = _original(model)(
        **kw,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    toks = ref.sequences[:, 6:]
    exact = hf_select.exact_logits(model, lay, kw, 5, toks)
    assert exact.dtype == torch.float32 and exact.shape == (2, 4, lay.vocab)
    # float32 math over the same weights: the float32 model's own logits, step by step
    f32 = tiny("llama", dtype=torch.float32)
    f32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    full = torch.cat([ids, toks[:, :4]], 1)
    fmask = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
    pos = (fmask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = f32(input_ids=full, attention_mask=fmask, position_ids=pos).logits[:, 6:10]
    # (the prefill cache is the bf16 model's, so agreement is at bf16 level, not fp32)
    assert (exact - want).norm() / want.norm() < 2e-2
    orig_err = (torch.stack(ref.logits, 1)[:, 1:].float() - exact).norm() / exact.norm()
    assert 0 < orig_err < 5e-2


def test_int8_is_opt_in_and_its_error_is_reported_and_bounded():
    from ryzen_opt import OptimizeConfig, optimize

    model = tiny("qwen2")
    ids, _ = left_padded(1, 8, [0])
    base = dict(use_cache=False, repeat=3, warmup=1, decode_batches=(1,))
    fast = optimize(model, example_inputs=ids, config=OptimizeConfig(**base))
    site = next(s for s in fast.optimization_report.sites if s.kind == "generate")
    assert not any(c.backend == "numba_decoder[int8]" for r in site.cases for c in r.candidates)
    cfg = OptimizeConfig(**base, fast_paths=("numba_decoder[int8]",))
    fast = optimize(model, example_inputs=ids, config=cfg)
    site = next(s for s in fast.optimization_report.sites if s.kind == "generate")
    res = site.cases[0].candidates[0]
    assert res.backend == "numba_decoder[int8]" and res.status in ("faster", "slower")
    assert 1e-4 < res.rel_error <= 2e-2 and "lossy (int8 weights)" in res.detail
    tight = OptimizeConfig(**base, fast_paths=("numba_decoder[int8]",), lossy_tolerance=1e-4)
    site = next(
        s
        for s in optimize(model, example_inputs=ids, config=tight).optimization_report.sites
        if s.kind == "generate"
    )
    assert site.cases[0].candidates[0].status == "error"
    with pytest.raises(ValueError, match="lossy_tolerance"):
        OptimizeConfig(lossy_tolerance=0)


def test_bf16_weights_are_opt_in_and_offered_only_with_avx512_bf16(monkeypatch):
    from ryzen_opt import OptimizeConfig, cpu_info, optimize

    model = tiny("qwen2")
    ids, _ = left_padded(1, 8, [0])
    cfg = OptimizeConfig(
        use_cache=False,
        repeat=3,
        warmup=1,
        decode_batches=(1,),
        fast_paths=("numba_decoder[bf16]",),
    )

    def candidate(flags):
        monkeypatch.setattr(cpu_info, "cpu_flags", lambda *a: flags)
        fast = optimize(model, example_inputs=ids, config=cfg)
        site = next(s for s in fast.optimization_report.sites if s.kind == "generate")
        return site.cases[0].candidates[0]

    res = candidate({"avx2", "fma"})
    assert res.status == "unsupported" and "AVX512-BF16" in res.detail and "AVX2" in res.detail
    res = candidate({"avx2", "fma", "avx512f", "avx512_bf16"})
    assert res.backend == "numba_decoder[bf16]" and res.status in ("faster", "slower")
    # bf16 rounding of the weights (2^-9 relative) shows, well inside the lossy bound.
    assert 1e-5 < res.rel_error <= 2e-2 and "lossy (bf16 weights)" in res.detail


def test_a_reverted_site_swap_keeps_the_measured_decode_loop(monkeypatch):
    import ryzen_opt.optimizer as front
    from ryzen_opt import OptimizeConfig, optimize

    monkeypatch.setattr(front, "check_whole_model", lambda *a, **k: "forced failure")
    model = tiny("gpt2")
    ids, _ = left_padded(1, 8, [0])
    cfg = OptimizeConfig(use_cache=False, repeat=4, warmup=1, decode_batches=(1,))
    fast = optimize(model, example_inputs=ids, config=cfg)
    rep = fast.optimization_report
    site = next(s for s in rep.sites if s.kind == "generate")
    if site.chosen:  # the loop won its own generate() comparison: the revert leaves it
        assert isinstance(fast.__dict__.get("generate"), fgen.FastGenerate)
        assert rep.changed and not site.note
    assert not any(s.chosen for s in rep.sites if s.kind != "generate")


def test_per_op_swaps_made_after_the_decode_path_leave_it_in_use(monkeypatch):
    # optimize() installs the decode path, then the per-op swaps (wrappers around the same
    # modules). Both are forced to win here (their timings forged, the whole-model check
    # passed): generate must still run the decode path, not see "modules changed".
    import ryzen_opt.optimizer as front
    from ryzen_opt import OptimizeConfig, optimize
    from ryzen_opt.optimization.engine import Engine
    from ryzen_opt.optimization.fastpaths import hf_select

    forged = {"speedup": 2.0, "ci": [1.8, 2.2], "baseline_s": 2e-3, "candidate_s": 1e-3, "n": 7}

    def faster(res, config):
        res.record_timing(dict(forged), config.min_speedup)

    monkeypatch.setattr(Engine, "time", lambda self, res, *a: faster(res, self.config))
    monkeypatch.setattr(hf_select, "_time", lambda *a, **k: faster(a[7], a[8]))
    monkeypatch.setattr(front, "check_whole_model", lambda *a, **k: None)
    model = tiny("gpt2")
    ids, mask = left_padded(1, 8, [0])
    cfg = OptimizeConfig(
        use_cache=False, repeat=4, warmup=1, decode_batches=(1,),
        fast_paths=("torch_static_decode",),
    )  # fmt: skip
    fast = optimize(model, example_inputs={"input_ids": ids, "attention_mask": mask}, config=cfg)
    rep = fast.optimization_report
    assert any(s.chosen for s in rep.sites if s.kind != "generate"), rep.notes
    assert next(s for s in rep.sites if s.kind == "generate").chosen
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = fast.generate(ids, **kw)
    assert fast.generate.last_route == "torch_static_decode"
    assert torch.equal(out, _original(model)(ids, **kw))
    # a module the user swaps in afterwards still sends generate to the original
    fast.transformer.h[0].mlp.c_fc = copy.deepcopy(fast.transformer.h[0].mlp.c_fc)
    fast.generate(ids, **kw)
    assert "modules changed" in fast.generate.last_route


def test_the_time_budget_bounds_the_decode_loop_selection():
    from ryzen_opt import OptimizeConfig, optimize

    model = tiny("llama")
    ids, _ = left_padded(1, 8, [0])
    cfg = OptimizeConfig(use_cache=False, repeat=4, warmup=1, time_budget_s=1e-6)
    fast = optimize(model, example_inputs=ids, config=cfg)
    rep = fast.optimization_report
    notes = " ".join(rep.notes)
    assert "the decoder fast paths: not measured, the time budget" in notes
    assert "generate" not in fast.__dict__
    # the summary does not call the model's candidates measured, and a note says what to do
    assert "the decoder fast paths" in rep.not_measured()
    assert "unchanged: no measured candidate" in rep.summary
    assert "not measured within the time budget" in rep.summary
    hint = rep.notes[-1]
    assert hint.startswith("not measured within the time budget of 1e-06 s: ")
    assert "raise OptimizeConfig.time_budget_s" in hint
    assert "python -m ryzen_opt.kernels.numba" in hint  # a CPU model
    assert rep.to_dict()["not_measured"] == rep.not_measured()


def _select(model, example, cfg, tmp_path, budget_left):
    """hf_select.select on ``model`` with no decision cache; returns the site report."""
    from ryzen_opt.optimization.cache import DecisionCache
    from ryzen_opt.optimization.fastpaths import hf_select

    layout = families.find(model)[0].layout(model)
    cache = DecisionCache(tmp_path, enabled=False)
    srep, _, _ = hf_select.select(
        model, layout, example, cfg, cache, "cpu", {}, "baseline", budget_left
    )
    return srep


def _select_with_a_slow_check(monkeypatch, tmp_path, check_s: float, left_s: float):
    """hf_select.select on a tiny Llama with ``left_s`` seconds always left and a check
    (``_verify``) that takes ``check_s`` seconds longer, as a cold JIT cache makes it."""
    import time

    from ryzen_opt import OptimizeConfig
    from ryzen_opt.optimization.fastpaths import hf_select

    real_verify = hf_select._verify

    def slow_verify(*args, **kw):
        time.sleep(check_s)
        return real_verify(*args, **kw)

    monkeypatch.setattr(hf_select, "_verify", slow_verify)
    model = tiny("llama")
    cfg = OptimizeConfig(
        use_cache=False, repeat=4, warmup=1, decode_batches=(1,),
        fast_paths=("torch_static_decode",), decode_tokens=4, min_sample_s=1e-6,
    )  # fmt: skip
    ids, mask = left_padded(1, 8, [0])
    example = {"input_ids": ids, "attention_mask": mask}
    srep = _select(model, example, cfg, tmp_path, lambda: left_s)
    return srep.cases[0].candidates[0]


def test_a_path_whose_check_was_slow_is_timed_when_its_warm_calls_fit(monkeypatch, tmp_path):
    # The check's 6 s would estimate the timing at over 7 x 3 s = 21 s, more than the 12 s
    # left; the warm calls (milliseconds) show that it fits, and the path is timed. Those
    # calls were the warm-up, each at least min_sample_s (1 us here): the comparison
    # makes no warm-up or calibration calls of its own.
    from ryzen_opt.optimization.fastpaths import hf_select

    seen = []
    real_compare = hf_select.compare

    def spy(*args, **kw):
        seen.append((kw["warmup"], kw["inner"]))
        return real_compare(*args, **kw)

    monkeypatch.setattr(hf_select, "compare", spy)
    res = _select_with_a_slow_check(monkeypatch, tmp_path, check_s=6.0, left_s=12.0)
    assert res.status in ("faster", "slower"), res.detail
    assert res.speedup > 0 and "not measured" not in res.detail
    assert seen == [(0, 1)]


def test_a_path_whose_check_alone_outlasts_the_budget_is_not_timed(monkeypatch, tmp_path):
    # Half the check (2 s, its own generate call) is more than the 1.5 s left: no warm call
    # is tried and the path is reported as not measured, with the estimate.
    res = _select_with_a_slow_check(monkeypatch, tmp_path, check_s=4.0, left_s=1.5)
    assert res.status == "unmeasured"
    assert "not measured: about" in res.detail and "2 s of the time budget left" in res.detail


def test_a_synthetic_prompt_avoids_the_pad_id_the_calls_pass():
    """A model without a pad token (the tiny Llama, like GPT-2) is called with
    ``pad_token_id=0``, so ``generate`` reads id 0 in a mask-less prompt as padding while the
    paths' checks did not: every path failed with the same logit error (6.4e-2 here)."""
    from ryzen_opt import OptimizeConfig
    from ryzen_opt.optimization.fastpaths import hf_select

    model = tiny("llama")
    assert model.generation_config.pad_token_id is None
    layout = families.find(model)[0].layout(model)
    cfg = OptimizeConfig(decode_batches=(1, 4), decode_tokens=4)
    for _, kw in hf_select.prompts(model, layout, None, cfg):
        assert kw["input_ids"].shape[1] == 64 and not bool((kw["input_ids"] == 0).any())


def test_the_original_runs_at_a_batch_size_when_the_first_path_gets_there(monkeypatch, tmp_path):
    """The first path is measured at batch 1 before the original's (long) batch-4 run takes
    the budget; batch 4, whose original run spends it, is reported as not measured."""
    import time

    from ryzen_opt import OptimizeConfig

    model = tiny("llama")
    cls = type(model)
    real_generate = cls.generate
    clock = [0.0]  # seconds charged on top of the real ones

    def generate(self, *args, **kw):
        if kw.get("output_logits") and kw["input_ids"].shape[0] == 4:
            clock[0] += 1000.0  # the original's batch-4 run "takes" 1000 s
        return real_generate(self, *args, **kw)

    monkeypatch.setattr(cls, "generate", generate)
    cfg = OptimizeConfig(
        use_cache=False, repeat=4, warmup=1, decode_batches=(1, 4),
        fast_paths=("torch_static_decode",), decode_tokens=4,
    )  # fmt: skip
    t0 = time.perf_counter()
    srep = _select(
        model, None, cfg, tmp_path, lambda: 600.0 - (time.perf_counter() - t0) - clock[0]
    )
    (b1, b4) = srep.cases
    assert b1.case == "decode b1" and b1.candidates[0].status in ("faster", "slower")
    assert b1.candidates[0].speedup > 0
    assert b4.candidates[0].status == "unmeasured"
    assert "the time budget was spent" in b4.candidates[0].detail
    assert srep.unmeasured == ["torch_static_decode at batch 4"]


def _select_after_batch_1(tmp_path, slow_s: float, first_only: bool):
    """hf_select.select over batches 1 and 4 of a tiny Llama whose original ``generate`` at
    batch 1 sleeps ``slow_s`` (on its first call only, or on every call); once batch 1's path
    is measured, the budget left is half what one path at batch 4 needs at least, estimated
    from batch 1's first call: more than its check alone. Returns the report and the batch
    sizes the original ran at."""
    import time

    from ryzen_opt import OptimizeConfig
    from ryzen_opt.optimization.fastpaths import hf_select

    model = tiny("llama")
    cls = type(model)
    real_generate, runs = cls.generate, []

    def generate(self, *args, **kw):
        if kw["input_ids"].shape[0] == 1 and (kw.get("output_logits") or not first_only):
            time.sleep(slow_s)
        if kw.get("output_logits"):
            runs.append(kw["input_ids"].shape[0])
        return real_generate(self, *args, **kw)

    cfg = OptimizeConfig(
        use_cache=False, repeat=4, warmup=1, decode_batches=(1, 4),
        fast_paths=("torch_static_decode",), decode_tokens=4,
    )  # fmt: skip
    left = [600.0]
    real_measure = hf_select._measure

    def measure(model, layout, name, m, *rest):
        res = real_measure(model, layout, name, m, *rest)
        if m.b == 1:
            left[0] = 0.5 * hf_select.path_cost_s(cfg, m.ref_s, cached=False)
            assert left[0] > hf_select.path_cost_s(cfg, m.ref_s, cached=True)
        return res

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "generate", generate)
        mp.setattr(hf_select, "_measure", measure)
        return _select(model, None, cfg, tmp_path, lambda: left[0]), runs


def test_a_larger_batch_is_not_run_when_no_path_could_be_timed_after_it(tmp_path):
    # Every batch-1 call takes 50 ms: a warm call confirms the estimate, and batch 4's
    # original (which cannot take less than batch 1's) is not run at all.
    srep, runs = _select_after_batch_1(tmp_path, 0.05, first_only=False)
    assert runs == [1]
    assert [c.case for c in srep.cases] == ["decode b1"]
    assert "batch 4 and up not measured: over" in srep.note
    assert srep.unmeasured == ["batch 4 and up"]


def test_a_slow_first_call_does_not_turn_a_larger_batch_away(tmp_path):
    # Only batch 1's first call is slow (0.3 s): a warm call of batch 1 (milliseconds) shows
    # that a path at batch 4 can fit, and batch 4 is measured.
    srep, runs = _select_after_batch_1(tmp_path, 0.3, first_only=True)
    assert runs == [1, 4]
    assert [c.case for c in srep.cases] == ["decode b1", "decode b4"]
    assert srep.cases[1].candidates[0].status in ("faster", "slower")


class _Shifted(torch.nn.Module):
    """A linear with a fixed update added, standing in for a LoRA layer wrapped in later."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base
        self.delta = torch.nn.Parameter(torch.full((base.out_features,), 0.5))

    def forward(self, x):
        return self.base(x) + self.delta


@pytest.mark.parametrize("path", CPU_PATHS)
def test_a_module_swapped_in_after_install_runs_the_original_code(path):
    model = _fast(tiny("llama"), path)
    ids, mask = left_padded(2, 7, [0, 2])
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    before = model.generate(ids, **kw)
    assert model.generate.last_route == path
    attn = model.model.layers[0].self_attn
    attn.q_proj = _Shifted(attn.q_proj)
    out = model.generate(ids, **kw)
    assert "modules changed" in model.generate.last_route
    assert torch.equal(out, _original(model)(ids, **kw)) and not torch.equal(out, before)


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_narrow_weights_follow_in_place_edits_of_the_model(weights):
    model = _fast(tiny("qwen2"), f"numba_decoder[{weights}]")
    ids, mask = left_padded(1, 7, [0])
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.generate(ids, **kw)
    dec = model.generate.steppers[1].dec
    with torch.no_grad():  # a merged adapter or load_state_dict edits a weight in place
        model.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
    assert not dec.current()
    out = model.generate(ids, **kw)
    assert model.generate.steppers[1].dec is not dec  # converted again from the new values
    fresh = _fast(copy.deepcopy(model), f"numba_decoder[{weights}]")
    assert torch.equal(out, fresh.generate(ids, **kw))


def test_the_timed_generate_makes_decode_timed_tokens(monkeypatch):
    from ryzen_opt import OptimizeConfig, optimize
    from ryzen_opt.optimization.fastpaths import hf_select

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert hf_select.timed_tokens(OptimizeConfig(), cpu) == 8
    assert hf_select.timed_tokens(OptimizeConfig(), cuda) == 16  # a GPU token is ~1 ms
    assert hf_select.timed_tokens(OptimizeConfig(decode_timed_tokens=12), cuda) == 12
    timed, checked = [], []
    real_time, real_verify = hf_select._time, hf_select._verify

    def spy_time(model, layout, name, b, kw, gk, *rest):
        timed.append(gk["max_new_tokens"])
        return real_time(model, layout, name, b, kw, gk, *rest)

    def spy_verify(model, layout, name, b, kw, n, *rest):
        checked.append(n)
        return real_verify(model, layout, name, b, kw, n, *rest)

    monkeypatch.setattr(hf_select, "_time", spy_time)
    monkeypatch.setattr(hf_select, "_verify", spy_verify)
    cfg = OptimizeConfig(
        use_cache=False,
        repeat=3,
        warmup=1,
        decode_batches=(1,),
        fast_paths=("torch_static_decode",),
        decode_tokens=4,
        decode_timed_tokens=12,
    )
    ids, mask = left_padded(1, 8, [0])
    fast = optimize(
        tiny("llama"), example_inputs={"input_ids": ids, "attention_mask": mask}, config=cfg
    )
    site = next(s for s in fast.optimization_report.sites if s.kind == "generate")
    assert timed == [12] and checked == [4]
    assert "4 greedy tokens after the prompt checked, 12 timed" in site.detail
    # a prompt near the context's end: the timed call shrinks to fit (96 positions here)
    timed.clear()
    ids, mask = left_padded(1, 90, [0])
    optimize(tiny("llama"), example_inputs={"input_ids": ids, "attention_mask": mask}, config=cfg)
    assert timed == [6]


@pytest.mark.parametrize("bad", [1, 0, 2.5, True, "8"])
def test_decode_timed_tokens_must_be_an_int_of_two_or_more(bad):
    from ryzen_opt import OptimizeConfig

    with pytest.raises(ValueError, match="decode_timed_tokens"):
        OptimizeConfig(decode_timed_tokens=bad)
