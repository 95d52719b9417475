"""The measuring engine behind ``optimize()``: verify, time, choose, check the whole model.

A candidate (a registry backend at one site, or a whole-step fast path) replaces the
original only after two measurements on the site's real inputs:

1. **verify** (:meth:`Engine.matches`): its output against the original's, relative error
   ``||out - ref|| / ||ref||`` (:func:`_rel_error`) within the dtype's tolerance, else
   "error";
2. **time** (:meth:`Engine.time`): interleaved against the original
   (:func:`ryzen_opt.timing.compare`, or a cached decision), "faster" only if the whole
   bootstrap interval of the speed-up lies above 1 and the median reaches ``min_speedup``.

**Choose** (:func:`pick_fastest`): per group of shapes, the candidate that was "faster" at
every shape, by the geometric mean of its speed-ups; that one rule serves the per-site
kernels (:meth:`Engine.decide`) and the fast paths (:meth:`Engine.fast_paths`). Last, the
**whole-model check** (:func:`check_whole_model`) runs the optimized model against an
unmodified reference (:func:`weight_sharing_copy`) on every run once more; what it will cost
is estimated beforehand (:func:`check_cost_s`) so that the time budget keeps room for it.

The engine never branches on what it measures beyond the site/fast-path split; it knows
nothing of the front door (``KernelOptimizer.apply``) that drives it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from ryzen_opt.kernels import registry
from ryzen_opt.kernels.reference import error_floor
from ryzen_opt.kernels.registry import BackendError
from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.optimization import fastpaths
from ryzen_opt.optimization.cache import DecisionCache, device_description, versions
from ryzen_opt.optimization.config import OptimizeConfig, dtype_name
from ryzen_opt.optimization.fastpaths import hf_select
from ryzen_opt.optimization.modules import Route
from ryzen_opt.optimization.report import (
    CandidateResult,
    CaseResult,
    ModelCheck,
    OptimizationReport,
    SiteReport,
)
from ryzen_opt.optimization.sites import Case, Run, Site
from ryzen_opt.timing import compare


def _rel_error(out: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[float, float]:
    """``||out - ref|| / max(||ref||, floor)`` and the largest absolute difference.

    The floor (:func:`ryzen_opt.kernels.reference.error_floor`) keeps a reference that
    cancels to near zero from turning rounding into a "relative error" of 1. Computed on the
    tensors' device (a CPU copy of a model's logits would cost more than the check). A
    non-finite output where the reference is finite is an infinite error.
    """
    o, r = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(o)[torch.isfinite(r)].all()):
        return math.inf, math.inf
    o, r = torch.nan_to_num(o), torch.nan_to_num(r)
    diff = o - r
    num = float(diff.norm())
    den = max(float(r.norm()), error_floor(ref.dtype, tol, ref.numel()))
    mx = float(diff.abs().max()) if diff.numel() else 0.0
    return (num / den if den else num), mx


@contextlib.contextmanager
def progress_bar(config: OptimizeConfig, total: int):
    """A rich progress bar over ``total`` steps (on a terminal, or when ``config.progress``).

    Yields ``advance(what)``: call it as each step starts (the decode-loop paths per batch
    size, the measured sites, the fast paths, the whole-model check); the bar shows ``what``.
    Where standard error is no terminal (a log file, a pipe) and ``progress=True`` asks for
    it, each step is a line instead (``optimize() 3/12 0:00:41 linear lm_head``): a live bar
    draws nothing there.
    """
    show = config.progress if config.progress is not None else sys.stderr.isatty()
    if not show:
        yield lambda what: None
        return
    import time

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cols = (
        TextColumn("optimize()"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    console = Console(stderr=True)
    lines = not (console.is_terminal or console.is_jupyter)
    t0 = time.perf_counter()
    with Progress(*cols, transient=True, console=console) as bar:
        task = bar.add_task("", total=total)
        state = {"done": -1}

        def advance(what: str) -> None:
            bar.update(task, advance=1 if state["done"] >= 0 else 0, description=what)
            state["done"] += 1
            if lines:
                s = int(time.perf_counter() - t0)
                clock = f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
                console.print(
                    f"optimize() {state['done']}/{total} {clock} {escape(what)}",
                    highlight=False,
                    soft_wrap=True,
                )

        yield advance
        bar.update(task, completed=total)


def weight_sharing_copy(model: nn.Module, share_buffers: bool = True) -> nn.Module:
    """A copy of ``model`` whose Parameters (and buffers) are new objects over the same
    storage; every module, config and other attribute is copied.

    ``optimize()``'s working copy and the whole-model check's reference: optimizing replaces
    modules and may rebind a Parameter's ``.data`` (the fused CPU decode step moves weights
    into its arena), which leaves the other copies' objects as they were, but never writes
    into the storage, so the original keeps its values at no cost in memory (a deep copy
    doubled the weights: 10.1 GB peak for a 2.2 GB bf16 Llama). Tied weights stay tied. A
    Parameter of a subclass (a quantised weight type) is deep-copied as before.

    Args:
        model: the module to copy.
        share_buffers: buffers too share their storage (else they are deep-copied).
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():  # deduplicated: a tied weight maps once
        if type(p) is nn.Parameter:
            memo[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)
    if share_buffers:
        for b in model.buffers():
            if type(b) is torch.Tensor:
                memo[id(b)] = b.detach()
    return copy.deepcopy(model, memo)


def check_cost_s(config: OptimizeConfig, runs: Sequence[Run]) -> float:
    """What :func:`check_whole_model` should take, in seconds, from the runs' capture times
    (``Run.setup_s``/``call_s``, first calls, so an upper bound): every run set up and called
    on both models, and one run per label and batch timed like a comparison (warm-up,
    calibration and ``repeat`` samples a side, each at least ``min_sample_s``)."""
    cfg = config
    total = 0.0
    timed: set[str] = set()
    for run in reversed(runs):  # the check times the last run of each label and batch
        total += 2 * (run.setup_s + run.call_s)
        tkey = f"{run.label}:{run.shape.split(' ')[0]}"
        if tkey not in timed:
            timed.add(tkey)
            total += 2 * (cfg.warmup + 1 + cfg.repeat) * max(run.call_s, cfg.min_sample_s)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_baseline_id(name: str, swapped: Sequence[SiteReport]) -> str:
    """What a whole-model baseline runs now, for the decision cache: ``name`` and every
    kernel swap chosen before (``name[path:case=backend,...]``)."""
    swaps = sorted(f"{s.path}:{k}={v}" for s in swapped for k, v in s.chosen.items())
    return f"{name}[" + ",".join(swaps) + "]"


def pick_fastest(names: Iterable[str], results: Sequence[CaseResult]) -> str | None:
    """The candidate name "faster" at every one of ``results`` with the best geometric-mean
    speed-up (the first on a tie), or ``None`` if none was faster everywhere."""
    best, best_score = None, 0.0
    for name in names:
        hits = [next((x for x in r.candidates if x.backend == name), None) for r in results]
        if any(h is None or h.status != "faster" for h in hits):
            continue
        score = math.exp(sum(math.log(h.speedup) for h in hits) / len(hits))
        if score > best_score:
            best, best_score = name, score
    return best


class Engine:
    """Verifies and times candidates for one :meth:`KernelOptimizer.apply` run.

    Args:
        config: the settings (tolerances, repeats, confidence, ``min_speedup``).
        device: where the model runs.
        dtype: the model's dtype (recorded in the routes it decides).
        cache: decisions measured before, reused when the device, versions and shape match.
    """

    def __init__(
        self,
        config: OptimizeConfig,
        device: torch.device,
        dtype: torch.dtype,
        cache: DecisionCache,
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.cache = cache
        self.device_description = device_description(device)
        self.versions = versions()

    # ------------------------------------------------------------------ kernel sites

    def measure_site(self, site: Site) -> tuple[SiteReport, list[Route]]:
        """Verify and time every candidate of every case of ``site``; its report and routes."""
        srep = SiteReport(site.path, site.kind, site.detail)
        results = []
        for case in site.cases:
            with torch.no_grad():
                ref = case.baseline()
            _sync(self.device)
            crep = CaseResult(case.label, case.shape)
            for cand in case.candidates:
                crep.candidates.append(self.evaluate(cand, case, ref, site))
            srep.cases.append(crep)
            results.append((case, crep))
        routes, srep.chosen = self.decide(site, results)
        return srep, routes

    def evaluate(self, cand, case: Case, ref: torch.Tensor, site: Site) -> CandidateResult:
        """One backend candidate at one case: supported? runs? matches? faster?"""
        dev = self.device
        backend = registry.backends(cand.op)[cand.backend]
        res = CandidateResult(cand.name, cand.op, "unsupported")
        reason = backend.why_not(dev.type, *cand.arguments())
        if reason is not None:
            res.detail = reason
            return res
        try:
            with torch.no_grad():
                out = cand.call()
            _sync(dev)
        except BackendError as e:
            res.detail = str(e)
            return res
        except Exception as e:
            res.status, res.detail = "failed", f"{type(e).__name__}: {e}"
            return res
        if not self.matches(res, out, ref):
            return res
        self.time(res, cand.op, cand.name, site.baseline_id, case.key, case.baseline, cand.call)
        return res

    def matches(
        self, res: CandidateResult, out, ref: torch.Tensor, dtype: torch.dtype | None = None
    ) -> bool:
        """Record the error of ``out`` against ``ref``; ``False`` (status "error") if too large.

        ``dtype``: whose tolerance applies (default ``ref``'s; a float32 loss reduced from a
        bfloat16 model's logits is held to bfloat16's)."""
        if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
            res.status = "error"
            res.detail = f"output shape {getattr(out, 'shape', None)} != {tuple(ref.shape)}"
            return False
        tol = self.config.tolerance_for(dtype or ref.dtype, self.device)
        err, max_abs = _rel_error(out, ref, tol)
        res.rel_error = err if res.rel_error is None else max(res.rel_error, err)
        res.max_abs_error = (
            max_abs if res.max_abs_error is None else max(res.max_abs_error, max_abs)
        )
        if not torch.isfinite(out).all() and torch.isfinite(ref).all():
            res.status, res.detail = "error", "non-finite output"
            return False
        if err > tol:
            res.status, res.detail = "error", f"relative error {err:.2e} > {tol:g}"
            return False
        return True

    def time(self, res, op, name, baseline_id, shape, baseline, call) -> None:
        """Time ``call`` against ``baseline`` (or reuse the cached decision); set the verdict."""
        cfg = self.config
        key = DecisionCache.key(
            device=self.device_description,
            versions=self.versions,
            op=op,
            candidate=name,
            baseline=baseline_id,
            shape=shape,
            repeat=cfg.repeat,
            min_sample_s=cfg.min_sample_s,
            confidence=cfg.confidence,
        )
        hit = self.cache.get(key)
        if hit is None:
            with torch.no_grad():
                cmp = compare(
                    baseline,
                    call,
                    repeat=cfg.repeat,
                    warmup=cfg.warmup,
                    device=self.device,
                    min_sample_s=cfg.min_sample_s,
                    confidence=cfg.confidence,
                )
            hit = DecisionCache.record(cmp)
            self.cache.put(key, hit)
        else:
            res.cached = True
        if not res.record_timing(hit, cfg.min_speedup):
            res.detail = res.slower_detail(cfg.min_speedup)

    def decide(
        self, site: Site, results: list[tuple[Case, CaseResult]]
    ) -> tuple[list[Route], dict[str, str]]:
        """Per case label: the backend faster at every shape of it (best geometric mean)."""
        routes: list[Route] = []
        chosen: dict[str, str] = {}
        for label in dict.fromkeys(c.label for c, _ in results):
            group = [(c, r) for c, r in results if c.label == label]
            names = [cand.name for cand in group[0][0].candidates]
            best = pick_fastest(names, [r for _, r in group])
            if best is None:
                continue
            cand = next(x for x in group[0][0].candidates if x.name == best)
            dims = sorted({d for c, _ in group for d in c.dims})
            bounds = tuple(
                (d, min(c.dims[d] for c, _ in group), max(c.dims[d] for c, _ in group))
                for d in dims
            )
            routes.append(
                Route(
                    site.route_case(label),
                    cand.op,
                    cand.backend,
                    self.device.type,
                    dtype_name(self.dtype),
                    bounds,
                    cand.packed,
                )
            )
            chosen[label] = best
        return routes, chosen

    # ------------------------------------------------------------------ fast paths

    def fast_paths(
        self, model: nn.Module, runs: list[Run], swapped: list[SiteReport]
    ) -> tuple[list[SiteReport], fastpaths.FastPaths | None]:
        """Verify and time the model-level fast paths; the winners as :class:`FastPaths`.

        Args:
            model: the model as it runs now (``swapped``'s kernel choices installed).
            runs: the plan's whole-model runs; the ``prefill`` and ``decode`` ones are used.
            swapped: the kernel sites' reports (the decision depends on what the model runs).
        """
        cfg = self.config
        if not isinstance(model, SimpleTransformerModel) or cfg.fast_paths == ():
            return [], None
        names = fastpaths.FAST_PATHS if cfg.fast_paths is None else cfg.fast_paths
        # The decision depends on what the model runs now (kernel swaps included).
        base_id = model_baseline_id("SimpleTransformerModel", swapped)
        reports, decode, prefill, measured_batches = [], [], {}, set()
        for kind in ("prefill", "decode"):
            kind_runs = [r for r in runs if r.label == kind]
            paths = [p for p in map(fastpaths.make_path, names) if p.kind == kind]
            if not kind_runs or not paths:
                continue
            srep = SiteReport(
                "(whole model)", f"{kind} step", "model-level fast path: the whole step at once"
            )
            groups: dict[tuple, list[CaseResult]] = {}
            for run in kind_runs:
                state = run.setup(model)
                ids = state if kind == "prefill" else state[0]
                group = tuple(ids.shape) if kind == "prefill" else (ids.shape[0],)
                label = (
                    f"{kind} {'x'.join(map(str, group))}"
                    if kind == "prefill"
                    else (f"decode b{group[0]}")
                )
                with torch.no_grad():
                    ref = run.call(model, state)
                _sync(self.device)
                crep = CaseResult(label, run.shape)
                for path in paths:
                    crep.candidates.append(
                        self.evaluate_path(path, run, state, model, ref, base_id)
                    )
                srep.cases.append(crep)
                groups.setdefault(group, []).append(crep)
            for group, creps in groups.items():
                name = pick_fastest([p.name for p in paths], creps)
                if name is not None:
                    best = next(p for p in paths if p.name == name)
                    srep.chosen[creps[0].case] = best.name
                    if kind == "prefill":
                        prefill[group] = best
                    else:
                        decode.append((group[0], best))
                if kind == "decode":
                    measured_batches.add(group[0])
            reports.append(srep)
        if not decode and not prefill:
            return reports, None
        ranges = fastpaths.routing.batch_ranges(measured_batches, dict(decode))
        return reports, fastpaths.FastPaths(ranges, prefill)

    def decoder_paths(
        self,
        model: nn.Module,
        layout,
        example,
        swapped: list[SiteReport],
        budget_left: Callable[[], float],
        prompt_len: int = 64,
        progress: Callable[[str], None] | None = None,
    ) -> tuple[SiteReport, list[tuple[int, int, str]], dict]:
        """A Hugging Face decoder's decode-loop paths, verified and timed through ``generate``
        (:func:`ryzen_opt.optimization.fastpaths.hf_select.select`): the report, the
        ``(lowest batch, highest batch, path name)`` routes of the winners and the state the
        paths built (for :func:`ryzen_opt.optimization.fastpaths.generate.install`).
        ``prompt_len``: the synthetic prompt's length when there is no example."""
        return hf_select.select(
            model,
            layout,
            example,
            self.config,
            self.cache,
            self.device_description,
            self.versions,
            model_baseline_id(type(model).__name__, swapped),
            budget_left,
            prompt_len=prompt_len,
            progress=progress,
        )

    def evaluate_path(self, path, run: Run, state, model, ref, baseline_id) -> CandidateResult:
        """Verify one fast path on one run (two decode steps: the cache writes count), time it."""
        op = f"{path.kind}_step"
        res = CandidateResult(path.name, op, "unsupported")
        reason = path.why_not(model)
        if reason is not None:
            res.detail = reason
            return res
        dev = ref.device
        try:
            with torch.no_grad():
                if path.kind == "prefill":
                    out = path(model, state, None, 0)[0]
                    ok = self.matches(res, out, ref)
                    del out

                    def call(m=model, x=state):
                        return path(m, x, None, 0)[0]

                else:
                    ids, tup = state
                    p = tup[0][0].shape[2]
                    static = path.adopt(model, tup)
                    if static is None:
                        raise RuntimeError("the static KV buffer is in use")
                    out, after = path(model, ids, static, p)
                    ok = self.matches(res, out, ref)
                    if ok and p + 1 < model.config.max_seq_len:
                        nxt = ref[:, -1].argmax(-1, keepdim=True)
                        ref2 = model(nxt, model(ids, tup)[1])[0]
                        out2 = path(model, nxt, after, p + 1)[0]
                        ok = self.matches(res, out2, ref2)
                    del out, after  # a live longer view would make every timed step copy

                    def call(m=model, x=ids, c=static, n=p):
                        return path(m, x, c, n)[0]

            _sync(dev)
        except Exception as e:
            res.status, res.detail = "failed", f"{type(e).__name__}: {e}"
            return res
        if not ok:
            return res
        self.time(res, op, path.name, baseline_id, run.shape, lambda: run.call(model, state), call)
        return res


def check_whole_model(
    config: OptimizeConfig,
    reference: nn.Module,
    model: nn.Module,
    runs: list[Run],
    device: torch.device,
    report: OptimizationReport,
) -> str | None:
    """Run ``model`` against ``reference`` on every run: error, and speed once per label and
    batch; each check goes into ``report``. The first failure's description, or ``None``."""
    cfg = config
    ref_model = reference
    was = ref_model.training
    ref_model.eval()
    failure = None
    timed: set[str] = set()
    try:
        with torch.no_grad():
            for run in runs:
                s_ref, s_opt = run.setup(ref_model), run.setup(model)
                out_ref, out_opt = run.call(ref_model, s_ref), run.call(model, s_opt)
                tol = cfg.tolerance_for(out_ref.dtype, device)
                err, _ = _rel_error(out_opt, out_ref, tol)
                check = ModelCheck(run.label, run.shape, err, tol)
                # Time one run per label and batch (the longest cache for decode).
                tkey = f"{run.label}:{run.shape.split(' ')[0]}"
                later = [r for r in runs if f"{r.label}:{r.shape.split(' ')[0]}" == tkey]
                if tkey not in timed and run is later[-1]:
                    timed.add(tkey)
                    cmp = compare(
                        lambda r=run, s=s_ref: r.call(ref_model, s),
                        lambda r=run, s=s_opt: r.call(model, s),
                        repeat=cfg.repeat,
                        warmup=cfg.warmup,
                        device=device,
                        min_sample_s=cfg.min_sample_s,
                        confidence=cfg.confidence,
                    )
                    check.speedup, check.ci = cmp.speedup, (cmp.ci_low, cmp.ci_high)
                if err > tol:
                    check.verdict = "error"
                    failure = failure or f"{run.label} {run.shape}: relative error {err:.2e}"
                elif (
                    check.ci is not None
                    and check.ci[1] < 1.0
                    and check.speedup < 1.0 / cfg.min_speedup
                ):
                    # Slower beyond the noise and by more than the margin a swap must win by
                    # (``min_speedup``): a 1% slowdown of a run no swap touches is not a
                    # regression to revert a 2x decode for (DESIGN: noise is not a regression).
                    check.verdict = "slower"
                    failure = failure or (
                        f"{run.label} {run.shape}: whole model slower ({check.speedup:.2f}x)"
                    )
                elif check.ci is not None and check.ci[0] > 1.0:
                    check.verdict = "faster"
                else:
                    check.verdict = "ok" if check.ci is None else "no significant change"
                report.model_checks.append(check)
    finally:
        ref_model.train(was)
    return failure
