"""``optimize_training(model, example_batch)``: faster training steps, verified and timed.

The training step is ``loss = causal_lm_loss(model, batch); loss.backward()``. For each part
of it (:data:`ryzen_opt.training.candidates.KINDS`: the loss head, the MLP activation, the
norm fused with the residual) every candidate that runs on the model's device is swapped
into a copy of the model and measured by ``optimize()``'s engine
(:class:`ryzen_opt.optimization.engine.Engine`), on the example batch:

1. **verify**: the loss and the gradient of every parameter against the original's
   (:meth:`Engine.matches`: relative error within the dtype tolerance of DESIGN.md). In
   bfloat16/float16 the original's own gradients are rounded too (two 16-bit computations of
   a 16-layer step differ by more than the 1e-2 tolerance while both are as close to exact),
   so there the reference is a float32 copy of the original on the same batch: a candidate's
   loss and each gradient may be as far from it as the original's own result plus the
   tolerance (:class:`_References`);
2. **time**: whole training steps (forward + backward), interleaved against the model as it
   is so far (:meth:`Engine.time`, :func:`ryzen_opt.timing.compare`);
3. **choose**: per part, the candidate faster beyond the noise with the best speed-up
   (:func:`ryzen_opt.optimization.engine.pick_fastest`), kept for the next part's baseline;
4. **together**: parts whose best candidate failed the rule on its own but ran faster at
   the median (on a Llama-1B step on an H200 the fused loss 1.02x [1.00, 1.03], SwiGLU
   1.03x [1.01, 1.04]) are swapped in together and timed once more as one change against
   the model as chosen so far; kept if the pair (or more) passes the same rule.

Last, the whole optimized step is checked against the original once more (gradients and
time); if it is wrong or slower every swap is undone and the model comes back unchanged.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn as nn

from ryzen_opt.optimization.cache import DecisionCache
from ryzen_opt.optimization.config import dtype_name, parse_dtype
from ryzen_opt.optimization.engine import Engine, _rel_error, pick_fastest, weight_sharing_copy
from ryzen_opt.optimization.report import (
    CandidateResult,
    CaseResult,
    ModelCheck,
    OptimizationReport,
    SiteReport,
)
from ryzen_opt.optimizer import _model_device_dtype, _parse_device, _require_module
from ryzen_opt.timing import PeakMemory, compare
from ryzen_opt.training import families
from ryzen_opt.training.candidates import CANDIDATES, KINDS
from ryzen_opt.training.config import TrainingConfig

__all__ = ["optimize_training"]

_SEED = 1234  # dropout masks: both sides of a gradient check draw the same ones


def _step(model: nn.Module, fam, batch: dict, ignore_index: int, seeded: bool):
    """One forward + backward; returns the loss (gradients are left in ``.grad``)."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad(), torch.random.fork_rng(devices=[], enabled=seeded):
        if seeded:
            torch.manual_seed(_SEED)
        loss = fam.loss(model, batch, ignore_index)
        loss.backward()
    return loss.detach()


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach()) for n, p in model.named_parameters()}


class _References:
    """What a candidate's training step is checked against.

    ``loss``/``grads``: the original model's step. In float32 (or wider) these are the
    reference: a candidate's loss and every gradient must be within the dtype tolerance of
    them. In a 16-bit dtype the original is itself rounded (its bf16 SiLU, its logits'
    cast), and a fused kernel that rounds once can differ from it by more than the
    tolerance while being closer to exact. There ``exact_loss``/``exact_grads`` come from a
    float32 copy of the original on the same batch and dropout masks, and each result passes
    if its error against the float32 value is at most the original's own error on that
    result (``limits``) plus the dtype tolerance: the bound a candidate within the tolerance
    of a perfectly rounded original would meet (triangle inequality), applied to the
    original as it is rounded.

    Measured on an H200 (Llama-1B step, bf16): the original's gradients lie up to 4.7e-2
    from float32. Two rules tried first failed equally accurate candidates: "no farther than
    the original on each gradient" (past the swapped op the backward runs the same bf16 ops
    on slightly different inputs, so each error is the original's plus or minus rounding
    noise: a coin flip per tensor) and "no farther than the original's farthest" (the fused
    loss's farthest gradient, 4.7e-2, landed a hair above the original's). A wrong gradient
    still fails: 5% off a gradient whose original error is 4.7e-2 puts it ~6.9e-2 away.
    """

    def __init__(self, reference: nn.Module, fam, batch: dict, ignore_index: int, tol) -> None:
        self.batch = batch  # what every check runs (the timings take the whole batch)
        self.loss = _step(reference, fam, batch, ignore_index, seeded=True)
        self.grads = _grads(reference)
        dtype = next(reference.parameters()).dtype
        self.exact_loss, self.exact_grads, self.limits = None, {}, {}
        if dtype.itemsize >= 4:
            return
        wide = copy.deepcopy(reference).float()
        self.exact_loss = _step(wide, fam, batch, ignore_index, seeded=True).float()
        self.exact_grads = _grads(wide)
        del wide
        self.limits["loss"] = _rel_error(self.loss, self.exact_loss, tol(dtype))[0]
        for name, g in self.grads.items():
            r = self.exact_grads.get(name)
            if g is not None and r is not None:
                self.limits[name] = _rel_error(g, r, tol(g.dtype))[0]

    def error(self, name: str, out: torch.Tensor, tol: float) -> tuple[float, float]:
        """``(error, allowed)`` of result ``name`` (``"loss"`` or a parameter's name)."""
        if self.exact_loss is None:
            ref = self.loss if name == "loss" else self.grads[name]
            return _rel_error(out, ref, tol)[0], tol
        ref = self.exact_loss if name == "loss" else self.exact_grads[name]
        return _rel_error(out, ref, tol)[0], self.limits.get(name, 0.0) + tol


def _check_grads(engine: Engine, res: CandidateResult, loss, grads, refs: _References) -> bool:
    """The loss and every gradient against the references (the largest error recorded)."""
    tol_of = lambda dt: engine.config.tolerance_for(dt, engine.device)  # noqa: E731
    results = [("loss", loss, engine.dtype)]
    for name, g in grads.items():
        if (g is None) != (refs.grads.get(name) is None):
            res.status, res.detail = "error", f"{name}: gradient present on one side only"
            return False
        if g is not None:
            results.append((name, g, g.dtype))
    for name, out, dt in results:
        err, allowed = refs.error(name, out, tol_of(dt))
        res.rel_error = err if res.rel_error is None else max(res.rel_error, err)
        if err > allowed:
            what = name if name == "loss" else f"grad {name}"
            res.status, res.detail = "error", f"{what}: relative error {err:.2e} > {allowed:.2g}"
            return False
    return True


def optimize_training(
    model: nn.Module,
    example_batch: Any,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    config: TrainingConfig | None = None,
) -> nn.Module:
    """A copy of ``model`` whose training step uses fused parts where they were verified and
    measured faster.

    The copy is independent (its own weights: training it leaves ``model`` as it was) and
    has the same parameter names, so checkpoints and optimizers see the same ``state_dict``.
    Compute its loss with :func:`ryzen_opt.training.causal_lm_loss` (any model), or for a
    transformers model ``model(input_ids, attention_mask=..., labels=...).loss`` (in
    training mode with labels the fused head returns ``logits=None``). A model that cannot
    be served, or for which no candidate won, comes back as an unchanged copy; its
    ``optimization_report`` says why.

    Args:
        model: a ``SimpleTransformerModel`` or a transformers Llama/Qwen2/Mistral/GPT-2
            causal LM.
        example_batch: a typical training batch: ``{"input_ids", "labels"}`` (plus
            ``"attention_mask"``) or ``(input_ids, labels)``; int64 labels of the
            ids' shape, each in ``[0, vocab)`` or ``config.ignore_index``. Seed-model labels
            are aligned with the positions, transformers labels are shifted by the model.
        device: move the copy here first.
        dtype: cast the copy first.
        config: :class:`TrainingConfig` (defaults when ``None``).

    Returns:
        The copy, with ``optimization_report`` (:class:`OptimizationReport`).

    Raises:
        TypeError / ValueError naming ``model``, ``example_batch[...]``, ``device``,
        ``dtype`` or ``config``.

    Example:
        >>> import torch
        >>> from ryzen_opt import ModelConfig, SimpleTransformerModel, optimize_training
        >>> from ryzen_opt.training import TrainingConfig, causal_lm_loss
        >>> m = SimpleTransformerModel(ModelConfig(num_layers=1, max_seq_len=16))
        >>> ids = torch.randint(0, 2048, (4, 16))
        >>> fast = optimize_training(m, (ids, ids), config=TrainingConfig(repeat=3))
        >>> causal_lm_loss(fast, (ids, ids)).backward()
    """
    _require_module(model)
    dev = _parse_device(device)
    dt = parse_dtype(dtype, "dtype")
    if config is None:
        config = TrainingConfig()
    if not isinstance(config, TrainingConfig):
        raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    work = copy.deepcopy(model)
    if dev is not None or dt is not None:
        work = work.to(device=dev, dtype=dt)
    device, dtype = _model_device_dtype(work)
    ocfg = config.optimize_config()
    cache = DecisionCache(ocfg.resolved_cache_dir, ocfg.use_cache)
    engine = Engine(ocfg, device, dtype, cache)
    report = OptimizationReport(
        type(model).__name__,
        str(device),
        dtype_name(dtype),
        environment={"device": engine.device_description, "versions": engine.versions},
        config=config.to_dict(),
        tool="optimize_training()",
    )
    work.optimization_report = report
    fam, why = families.find(work)
    if fam is None or why is not None:
        report.notes.append(f"model not served, returned unchanged: {why}")
        report.elapsed_s = time.perf_counter() - t0
        return work
    batch = families.check_batch(
        example_batch, fam.vocab_size(work), device, config.ignore_index, "example_batch"
    )
    was_training = work.training
    work.train()
    # The caller's random state is left as it was (a trainer seeds its run once: measuring
    # must not shift its dropout masks).
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        # what measuring costs goes into the report (a 20 ms sampler stays out of the timings)
        with PeakMemory(device, interval_s=0.02) as mem, torch.random.fork_rng(devices=cuda):
            _select(work, fam, batch, config, engine, report)
        report.peak_memory_bytes = mem.peak_bytes
    finally:
        work.train(was_training)
        unsaved = cache.save()
        if unsaved is not None:
            report.notes.append(unsaved)
    report.elapsed_s = time.perf_counter() - t0
    return work


def _check_batch(batch: dict, config: TrainingConfig, dtype: torch.dtype) -> dict:
    """The first rows of ``batch`` that the gradient checks run on
    (:attr:`TrainingConfig.check_rows`)."""
    rows = batch["input_ids"].shape[0]
    n = config.check_rows
    if n is None:
        n = rows if dtype.itemsize >= 4 else -(-rows // 4)
    n = min(n, rows)
    return {k: v[:n] for k, v in batch.items()}


def _select(work, fam, batch, config: TrainingConfig, engine: Engine, report) -> None:
    ii = config.ignore_index
    shape = "x".join(map(str, batch["input_ids"].shape))
    reference = weight_sharing_copy(work)
    check = _check_batch(batch, config, engine.dtype)
    refs = _References(
        reference, fam, check, ii, lambda dt: engine.config.tolerance_for(dt, engine.device)
    )
    if check["input_ids"].shape[0] < batch["input_ids"].shape[0]:
        report.notes.append(
            f"gradients checked on the first {check['input_ids'].shape[0]} of the example "
            f"batch's {batch['input_ids'].shape[0]} rows (TrainingConfig.check_rows); every "
            "timing takes the whole batch"
        )
    reference.zero_grad(set_to_none=True)
    if refs.exact_loss is not None:
        name, worst = max(refs.limits.items(), key=lambda kv: kv[1])
        report.notes.append(
            f"checked against a float32 copy of the original on the same batch: each result "
            f"may be as far from it as the original's own plus the {dtype_name(engine.dtype)} "
            f"tolerance (the original's farthest: {worst:.2e}, {name})"
        )
    wanted = config.candidates
    undo, installed, near = [], [], []
    for kind in KINDS:
        cands = [c for c in CANDIDATES.values() if c.kind == kind]
        report.backends[kind] = []
        srep = SiteReport("(training step)", kind, f"{fam.name}: the step's {kind}")
        crep = CaseResult("train step", f"batch {shape}")
        base_id = f"train[{type(work).__name__}:{','.join(installed)}]"
        for c in cands:
            res = CandidateResult(c.name, f"train_{kind.replace(' ', '_')}", "unsupported")
            if wanted is not None and c.name not in wanted and c.name not in config.force:
                continue
            if wanted is None and not c.default and c.name not in config.force:
                report.notes.append(f"{c.name} not tried: opt-in ({c.opt_in_reason})")
                continue
            if engine.device.type not in c.devices:
                res.detail = f"runs on {'/'.join(c.devices)}, the model is on {engine.device.type}"
            elif (reason := c.why_not(work, fam)) is not None:
                res.detail = reason
            else:
                report.backends[kind].append(c.name)
                _measure(c, res, work, fam, batch, config, engine, refs, base_id)
            crep.candidates.append(res)
        if not crep.candidates:
            continue
        srep.cases.append(crep)
        forced = [r.backend for r in crep.candidates if r.status == "forced"]
        best = forced[0] if forced else pick_fastest([r.backend for r in crep.candidates], [crep])
        if best is not None:
            undo.append(CANDIDATES[best].install(work, fam, config))
            installed.append(best)
            srep.chosen["train step"] = best
        else:
            near += _near_miss(crep)
        report.sites.append(srep)
    if len(near) >= 2:
        base_id = f"train[{type(work).__name__}:{','.join(installed)}]"
        undo += _together(near, work, fam, batch, config, engine, refs, base_id, report)
    report.changed = bool(undo)
    if undo:
        failure = _check_whole(work, reference, refs, fam, batch, config, engine, report, shape)
        if failure:
            for u in reversed(undo):
                u()
            report.changed = False
            report.notes.append(f"reverted every swap: {failure}")
            for s in report.sites:
                if s.chosen:
                    s.note, s.chosen = f"reverted ({failure})", {}
    if not report.changed:
        report.notes.append(
            "the training step is unchanged: no candidate was both within tolerance and "
            "faster than the original here"
        )


def _near_miss(crep: CaseResult) -> list[str]:
    """The part's fastest candidate that failed the rule alone but ran faster at the median,
    its interval not wholly below 1: ``[name]``, or ``[]``. The pair or more of them is then
    held to the full rule as one change, so a candidate that saves nothing cannot carry it."""
    near = [
        r for r in crep.candidates
        if r.status == "slower" and r.speedup is not None and r.speedup > 1.0
        and r.ci and r.ci[1] > 1.0
    ]  # fmt: skip
    return [max(near, key=lambda r: r.speedup).backend] if near else []


def _together(names, work, fam, batch, config, engine, refs, base_id, report) -> list:
    """Time the near misses ``names`` (one per part) swapped in together against ``work``;
    install them on ``work`` if the change passes the rule. Returns their undo callables."""
    name = "+".join(names)
    srep = SiteReport("(training step)", "together", f"{fam.name}: {', '.join(names)} at once")
    crep = CaseResult("train step", f"batch {'x'.join(map(str, batch['input_ids'].shape))}")
    res = CandidateResult(name, "train_together", "unsupported")
    _measure([CANDIDATES[n] for n in names], res, work, fam, batch, config, engine, refs, base_id)
    crep.candidates.append(res)
    srep.cases.append(crep)
    report.sites.append(srep)
    report.backends["together"] = [name]
    if res.status != "faster":
        return []
    srep.chosen["train step"] = name
    return [CANDIDATES[n].install(work, fam, config) for n in names]


def _measure(c, res, work, fam, batch, config, engine, refs, base_id) -> None:
    """Verify candidate ``c`` (or a list of candidates, swapped in together) on a copy of
    ``work``; time it unless it is forced."""
    ii = config.ignore_index
    cands = c if isinstance(c, list) else [c]
    name = "+".join(x.name for x in cands)
    trial = weight_sharing_copy(work)
    try:
        for x in cands:
            x.install(trial, fam, config)
        loss = _step(trial, fam, refs.batch, ii, seeded=True)
        grads = _grads(trial)
    except Exception as e:
        res.status, res.detail = "failed", f"{type(e).__name__}: {str(e)[:300]}"
        return
    ok = _check_grads(engine, res, loss, grads, refs)
    del grads
    trial.zero_grad(set_to_none=True)
    if not ok:
        return
    if name in config.force:
        res.status, res.detail = "forced", "installed without the speed requirement (force)"
        return
    shape = f"{tuple(batch['input_ids'].shape)} {engine.dtype}"
    engine.time(
        res,
        res.op,
        name,
        base_id,
        shape,
        lambda: _step(work, fam, batch, ii, seeded=False),
        lambda: _step(trial, fam, batch, ii, seeded=False),
    )
    work.zero_grad(set_to_none=True)
    trial.zero_grad(set_to_none=True)


def _check_whole(work, reference, refs, fam, batch, config, engine, report, shape) -> str | None:
    """The optimized step against the references (:class:`_References`), and its speed."""
    ii = config.ignore_index
    cfg = engine.config
    loss = _step(work, fam, refs.batch, ii, seeded=True)
    # each error against what it may reach; the check reports the worst share of it
    tol_of = lambda dt: cfg.tolerance_for(dt, engine.device)  # noqa: E731
    tol = tol_of(engine.dtype)
    err, allowed = refs.error("loss", loss, tol)
    worst = err / allowed
    for n, g in _grads(work).items():
        if g is not None and refs.grads.get(n) is not None:
            e, a = refs.error(n, g, tol_of(g.dtype))
            worst = max(worst, e / a)
            err = max(err, e)
    work.zero_grad(set_to_none=True)
    check = ModelCheck("train step", f"batch {shape}", err, tol)
    report.model_checks.append(check)
    if worst > 1.0:
        check.verdict = "error"
        return f"train step: relative error {err:.2e} of the loss or a gradient"
    forced = any(s.chosen.get("train step") in config.force for s in report.sites)
    if not cfg.model_check or forced:
        check.verdict = "ok" if not forced else "not timed (forced candidates)"
        return None
    cmp = compare(
        lambda: _step(reference, fam, batch, ii, seeded=False),
        lambda: _step(work, fam, batch, ii, seeded=False),
        repeat=cfg.repeat,
        warmup=cfg.warmup,
        device=engine.device,
        min_sample_s=cfg.min_sample_s,
        confidence=cfg.confidence,
    )
    work.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    check.speedup, check.ci = cmp.speedup, (cmp.ci_low, cmp.ci_high)
    if cmp.ci_high < 1.0:
        check.verdict = "slower"
        return f"train step: whole step slower ({cmp.speedup:.2f}x)"
    check.verdict = "faster" if cmp.ci_low > 1.0 else "no significant change"
    return None
