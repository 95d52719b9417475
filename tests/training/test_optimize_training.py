"""``optimize_training``: selection rules (verified, timed, kept only if faster), the report,
the original untouched, and bad input."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ryzen_opt import optimize_training
from ryzen_opt.training import TrainingConfig, candidates, causal_lm_loss, linear_cross_entropy
from ryzen_opt.training.families import FusedLMHead
from tests.training.minimodels import batches, build

QUICK = dict(repeat=3, warmup=1)


def _fake(monkeypatch, name, loss_fn):
    """Register a CPU loss-head candidate ``name`` computing ``loss_fn``."""

    class C:
        @staticmethod
        def why_not(model, fam):
            return None

        @staticmethod
        def install(model, fam, config):
            return candidates._install_head(model, fam, loss_fn, name, None)

    monkeypatch.setitem(
        candidates.CANDIDATES,
        name,
        candidates.Candidate(name, "loss head", ("cpu",), C.why_not, C.install),
    )


def _slow_loss(h, w, labels, bias=None, *, ignore_index=-100, chunk_size=None):
    time.sleep(0.05)
    return F.cross_entropy(F.linear(h, w, bias), labels, ignore_index=ignore_index)


def _wrong_loss(h, w, labels, bias=None, *, ignore_index=-100, chunk_size=None):
    return 1.001 * F.cross_entropy(F.linear(h, w, bias), labels, ignore_index=ignore_index)


def test_a_slower_candidate_is_rejected_and_the_model_comes_back_unchanged(monkeypatch):
    _fake(monkeypatch, "slow_head", _slow_loss)
    model = build("seed")
    fast = optimize_training(
        model, batches("seed", 1)[0], config=TrainingConfig(candidates=("slow_head",), **QUICK)
    )
    rep = fast.optimization_report
    assert not rep.changed
    [res] = [c for s in rep.sites for r in s.cases for c in r.candidates]
    assert res.status == "slower" and res.speedup < 1
    assert not rep.model_checks  # rejected when measured, not installed and reverted later
    assert isinstance(fast.head, nn.Linear) and not isinstance(fast.head, FusedLMHead)
    assert "unchanged" in rep.to_markdown()


def test_a_candidate_with_wrong_gradients_is_rejected_even_when_forced(monkeypatch):
    _fake(monkeypatch, "wrong_head", _wrong_loss)
    cfg = TrainingConfig(candidates=("wrong_head",), force=("wrong_head",), **QUICK)
    fast = optimize_training(build("seed"), batches("seed", 1)[0], config=cfg)
    [res] = [c for s in fast.optimization_report.sites for r in s.cases for c in r.candidates]
    assert res.status == "error" and "loss" in res.detail
    assert not fast.optimization_report.changed
    assert not isinstance(fast.head, FusedLMHead)


def test_the_fused_head_is_timed_and_kept_only_with_its_measurement():
    model = build("seed")
    fast = optimize_training(
        model, batches("seed", 1)[0], config=TrainingConfig(candidates=("chunked_lce",), **QUICK)
    )
    rep = fast.optimization_report
    [res] = [c for s in rep.sites for r in s.cases for c in r.candidates]
    assert res.speedup is not None and res.rel_error < 1e-4
    assert rep.changed == isinstance(fast.head, FusedLMHead)
    if rep.changed:
        assert res.status == "faster" and res.ci[0] > 1.0


def test_the_original_is_untouched_and_the_copy_is_independent():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b = batches("llama", 1)[0]
    cfg = TrainingConfig(candidates=("chunked_lce",), force=("chunked_lce",))
    fast = optimize_training(model, b, config=cfg)
    assert isinstance(fast.lm_head, FusedLMHead) and isinstance(model.lm_head, nn.Linear)
    assert type(model).forward is not type(fast).forward
    assert fast.state_dict().keys() == model.state_dict().keys()
    fast.train()
    out = fast(**b)  # transformers' own call, through the fused head while training
    assert out.logits is None
    out.loss.backward()
    torch.optim.SGD(fast.parameters(), lr=1.0).step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    fast.eval()
    assert fast(b["input_ids"]).logits.shape == (*b["input_ids"].shape, 97)


def test_cuda_candidates_are_reported_unsupported_on_the_cpu():
    fast = optimize_training(build("seed"), batches("seed", 1)[0], config=TrainingConfig(**QUICK))
    rep = fast.optimization_report
    why = {c.backend: c.detail for s in rep.sites for r in s.cases for c in r.candidates}
    assert "runs on cuda" in why["triton_lce"]
    assert any("compiled_head not tried" in n for n in rep.notes)


def test_missing_gpu_kernels_are_a_reason_not_an_error(monkeypatch):
    monkeypatch.setattr(candidates, "GPU_OPS", "ryzen_opt.kernels.no_such_package")
    c = candidates.CANDIDATES["triton_lce"]
    monkeypatch.setitem(
        candidates.CANDIDATES, "triton_lce", dataclasses.replace(c, devices=("cpu",))
    )
    cfg = TrainingConfig(candidates=("triton_lce",), **QUICK)
    fast = optimize_training(build("seed"), batches("seed", 1)[0], config=cfg)
    [res] = [c for s in fast.optimization_report.sites for r in s.cases for c in r.candidates]
    assert res.status == "unsupported" and "not importable" in res.detail


def test_a_model_it_cannot_serve_comes_back_unchanged_with_the_reason():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    ids = torch.randint(0, 10, (2, 5))
    fast = optimize_training(model, (ids, ids))
    assert fast is not model and not fast.optimization_report.changed
    assert "not served" in fast.optimization_report.notes[0]
    assert "Sequential" in fast.optimization_report.notes[0]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: {**b, "labels": b["labels"][:, :-1]}, r"example_batch\['labels'\].*shape"),
        (lambda b: {**b, "labels": b["labels"].int()}, r"example_batch\['labels'\].*int64"),
        (lambda b: {**b, "labels": b["labels"].clamp(min=0) + 64}, r"labels'\] must lie in"),
        (lambda b: {**b, "input_ids": b["input_ids"].float()}, r"example_batch\['input_ids'\]"),
        (lambda b: {**b, "input_ids": b["input_ids"] + 64}, r"input_ids'\] must lie in"),
        (lambda b: {**b, "labels": torch.full_like(b["labels"], -100)}, "no position"),
        (lambda b: {"input_ids": b["input_ids"]}, "must have keys"),
        (lambda b: b["input_ids"], "example_batch must be"),
    ],
)
def test_bad_batches_raise_naming_the_argument(mutate, match):
    b = batches("seed", 1)[0]
    with pytest.raises((TypeError, ValueError), match=match):
        optimize_training(build("seed"), mutate(b))


def test_bad_arguments_raise_naming_them():
    b = batches("seed", 1)[0]
    m = build("seed")
    with pytest.raises(TypeError, match="model"):
        optimize_training("model", b)
    with pytest.raises(ValueError, match="dtype"):
        optimize_training(m, b, dtype="int8")
    with pytest.raises(ValueError, match="device"):
        optimize_training(m, b, device="tpu")
    with pytest.raises(TypeError, match="config"):
        optimize_training(m, b, config={"repeat": 3})
    with pytest.raises(ValueError, match="candidates"):
        TrainingConfig(candidates=("nope",))
    with pytest.raises(ValueError, match="repeat"):
        TrainingConfig(repeat=1)
    with pytest.raises(ValueError, match="chunk_size"):
        TrainingConfig(chunk_size=0)


def test_dtype_argument_casts_the_copy_only():
    m = build("seed")
    cfg = TrainingConfig(candidates=("chunked_lce",), force=("chunked_lce",))
    fast = optimize_training(m, batches("seed", 1)[0], dtype="bf16", config=cfg)
    assert fast.head.weight.dtype == torch.bfloat16 and m.head.weight.dtype == torch.float32
    assert fast.optimization_report.dtype == "bfloat16"


# ---------------------------------------------------------------- the CPU op itself


@pytest.mark.parametrize("chunk", [None, 1, 5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_float64_cross_entropy(chunk, with_bias):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(13, 7, generator=g, requires_grad=True)
    w = torch.randn(11, 7, generator=g, requires_grad=True)
    b = torch.randn(11, generator=g, requires_grad=True) if with_bias else None
    y = torch.randint(0, 11, (13,), generator=g)
    y[[0, 4, 12]] = -100
    loss = linear_cross_entropy(h, w, y, b, chunk_size=chunk)
    (2.5 * loss).backward()  # a non-unit upstream gradient
    got = [h.grad, w.grad] + ([b.grad] if with_bias else [])
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if with_bias else None
    ref = F.cross_entropy(F.linear(hd, wd, bd), y, ignore_index=-100)
    (2.5 * ref).backward()
    want = [hd.grad, wd.grad] + ([bd.grad] if with_bias else [])
    torch.testing.assert_close(loss.double(), ref.detach(), atol=0, rtol=1e-6)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), e, atol=1e-6, rtol=1e-5)
    assert torch.all(h.grad[[0, 4, 12]] == 0)


def test_linear_cross_entropy_bad_input_names_the_argument():
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, y.int())
    with pytest.raises(ValueError, match="labels must lie"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(torch.randn(4, 2), w, y)
    with pytest.raises(TypeError, match="hidden and weight"):
        linear_cross_entropy(h.double(), w, y)
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(h, w, y, torch.randn(4))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, y, chunk_size=0)
    assert torch.isnan(linear_cross_entropy(h, w, torch.full((4,), -100)))


def test_causal_lm_loss_of_the_original_is_the_plain_computation():
    m = build("seed")
    b = batches("seed", 1)[0]
    logits, _ = m(b["input_ids"])
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1))
    assert torch.equal(causal_lm_loss(m, b), want)
    assert torch.equal(causal_lm_loss(m, (b["input_ids"], b["labels"])), want)
    with pytest.raises(ValueError, match="model cannot be served"):
        causal_lm_loss(nn.Linear(2, 2), b)


def _float32_loss(h, w, labels, bias=None, *, ignore_index=-100, chunk_size=None):
    logits = F.linear(h.float(), w.float(), None if bias is None else bias.float())
    return F.cross_entropy(logits, labels, ignore_index=ignore_index).to(h.dtype)


def _wrong_by_five_percent(h, w, labels, bias=None, *, ignore_index=-100, chunk_size=None):
    return 1.05 * _float32_loss(h, w, labels, bias, ignore_index=ignore_index)


def test_bfloat16_steps_are_checked_against_a_float32_copy(monkeypatch):
    _fake(monkeypatch, "f32_head", _float32_loss)
    _fake(monkeypatch, "wrong_head", _wrong_by_five_percent)
    names = ("f32_head", "wrong_head")
    cfg = TrainingConfig(candidates=names, force=names, **QUICK)
    fast = optimize_training(build("llama"), batches("llama", 1)[0], dtype="bfloat16", config=cfg)
    rep = fast.optimization_report
    res = {c.backend: c for s in rep.sites for r in s.cases for c in r.candidates}
    assert res["f32_head"].status == "forced", res["f32_head"].detail
    assert res["wrong_head"].status == "error" and "loss" in res["wrong_head"].detail
    assert any("float32 copy of the original" in n for n in rep.notes)
    assert rep.changed and rep.model_checks[0].verdict != "error"


def test_a_16_bit_result_may_add_the_tolerance_to_the_originals_own_error():
    from ryzen_opt.training.optimize import _References

    # factors exact in bfloat16: 1 + 1/32 (the original), 1 + 1/64, 1 + 5/128 and 1 + 3/64
    exact = torch.ones(1000, dtype=torch.float32)
    refs = _References.__new__(_References)
    refs.loss, refs.grads = torch.tensor(1.0), {"w": (exact * 1.03125).bfloat16()}
    refs.exact_loss, refs.exact_grads = torch.tensor(1.0), {"w": exact}
    refs.limits = {"loss": 0.0, "w": 0.03125}  # the original's own errors
    err, allowed = refs.error("w", (exact * 1.015625).bfloat16(), 1e-2)
    assert allowed == pytest.approx(0.04125) and err == pytest.approx(0.015625)
    err, allowed = refs.error("w", (exact * 1.0390625).bfloat16(), 1e-2)
    assert err == pytest.approx(0.0390625) and err <= allowed  # a bit farther: within
    err, allowed = refs.error("w", (exact * 1.046875).bfloat16(), 1e-2)
    assert err == pytest.approx(0.046875) and err > allowed
    # the loss, exact in the original, gets the tolerance alone
    err, allowed = refs.error("loss", torch.tensor(1.015625), 1e-2)
    assert allowed == 1e-2 and err > allowed
    # no float32 copy (a float32 model): the original is the reference, at the tolerance
    refs.exact_loss, refs.limits = None, {}
    err, allowed = refs.error("w", (exact * 1.046875).bfloat16(), 1e-2)
    assert allowed == 1e-2 and err == pytest.approx(0.015, abs=1e-3)


def test_the_norm_candidate_finds_every_norm_and_refuses_other_kinds():
    llama = build("llama")
    norms, why = candidates._hf_norms(llama)
    assert why is None and all(how == "rms" for _, how in norms.values())
    assert len(norms) == 2 * llama.config.num_hidden_layers + 1  # two a layer and the last
    gpt2 = build("gpt2")
    norms, why = candidates._hf_norms(gpt2)
    assert why is None and {how for _, how in norms.values()} == {"layer"}

    class OffsetRMSNorm(nn.Module):  # a (1 + weight) norm keeping ``eps``: not served
        def __init__(self):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.zeros(4)), 1e-6

    llama.model.norm = OffsetRMSNorm()
    norms, why = candidates._hf_norms(llama)
    assert norms is None and "model.norm (OffsetRMSNorm)" in why
    assert "triton_norm_residual" in candidates.CANDIDATES["triton_norm"].why_not(
        build("seed"), candidates.STM
    )


def _exact_loss(h, w, labels, bias=None, *, ignore_index=-100, chunk_size=None):
    return F.cross_entropy(F.linear(h, w, bias), labels, ignore_index=ignore_index)


def _fake_norm(monkeypatch, name):
    """Register a CPU norm candidate ``name`` that swaps nothing (exact, installs a marker)."""

    def install(model, fam, config):
        model.marked = getattr(model, "marked", ()) + (name,)

        def undo():
            model.marked = tuple(m for m in model.marked if m != name)

        return undo

    monkeypatch.setitem(
        candidates.CANDIDATES,
        name,
        candidates.Candidate(name, "norm + residual", ("cpu",), lambda m, f: None, install),
    )


def _fake_timings(monkeypatch, speedups):
    """``Engine.time`` records the given (median, ci low, ci high) per candidate name."""
    from ryzen_opt.optimization.engine import Engine

    def fake(self, res, op, name, baseline_id, shape, baseline, call):
        med, lo, hi = speedups[name]
        hit = {"speedup": med, "ci": [lo, hi], "baseline_s": 1.0, "candidate_s": 1.0 / med}
        if not res.record_timing(hit, self.config.min_speedup):
            res.detail = res.slower_detail(self.config.min_speedup)

    monkeypatch.setattr(Engine, "time", fake)


@pytest.mark.parametrize(
    "head, joint",
    [
        ((1.03, 1.01, 1.05), (1.08, 1.06, 1.10)),
        ((1.03, 1.01, 1.05), (1.04, 1.02, 1.06)),
        ((1.02, 0.99, 1.04), (1.06, 1.05, 1.07)),  # faster at the median, within the noise
    ],
)
def test_near_misses_of_several_parts_are_timed_together(monkeypatch, head, joint):
    _fake(monkeypatch, "head_a", _exact_loss)
    _fake_norm(monkeypatch, "norm_b")
    # each alone under the rule (CI above 1 and >= 1.05x), faster at the median
    _fake_timings(
        monkeypatch, {"head_a": head, "norm_b": (1.02, 1.01, 1.03), "head_a+norm_b": joint}
    )
    cfg = TrainingConfig(candidates=("head_a", "norm_b"), model_check=False, **QUICK)
    fast = optimize_training(build("seed"), batches("seed", 1)[0], config=cfg)
    rep = fast.optimization_report
    res = {c.backend: c for s in rep.sites for r in s.cases for c in r.candidates}
    assert res["head_a"].status == res["norm_b"].status == "slower"
    together = res["head_a+norm_b"]
    assert together.speedup == joint[0] and together.rel_error is not None
    kept = joint[1] > 1.0 and joint[0] >= cfg.min_speedup
    assert together.status == ("faster" if kept else "slower")
    assert rep.changed == kept
    assert isinstance(fast.head, FusedLMHead) == kept
    assert getattr(fast, "marked", ()) == (("norm_b",) if kept else ())
    md = rep.to_markdown()
    assert "head_a+norm_b" in md and "together" in md


def test_a_single_near_miss_is_not_retimed(monkeypatch):
    _fake(monkeypatch, "head_a", _exact_loss)
    _fake_norm(monkeypatch, "norm_b")
    _fake_timings(monkeypatch, {"head_a": (1.03, 1.01, 1.05), "norm_b": (0.99, 0.97, 1.01)})
    cfg = TrainingConfig(candidates=("head_a", "norm_b"), model_check=False, **QUICK)
    fast = optimize_training(build("seed"), batches("seed", 1)[0], config=cfg)
    rep = fast.optimization_report
    assert not rep.changed
    assert all(s.kind != "together" for s in rep.sites)


@pytest.mark.parametrize(
    "dtype, check_rows, expect", [("bfloat16", None, 1), ("float32", None, 4), ("bfloat16", 3, 3)]
)
def test_gradient_checks_run_on_the_rows_check_rows_names(monkeypatch, dtype, check_rows, expect):
    from ryzen_opt.training import optimize as opt_mod

    seen = []
    real = opt_mod._step

    def spy(model, fam, batch, ii, seeded):
        if seeded:  # every check step is seeded; timing steps are not
            seen.append(batch["input_ids"].shape[0])
        return real(model, fam, batch, ii, seeded)

    monkeypatch.setattr(opt_mod, "_step", spy)
    _fake(monkeypatch, "exact_head", _exact_loss)
    cfg = TrainingConfig(candidates=("exact_head",), check_rows=check_rows, **QUICK)
    fast = optimize_training(build("llama"), batches("llama", 1)[0], dtype=dtype, config=cfg)
    assert seen and set(seen) == {expect}
    noted = any("gradients checked on the first" in n for n in fast.optimization_report.notes)
    assert noted == (expect < 4)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_check_rows_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="check_rows"):
        TrainingConfig(check_rows=bad)
