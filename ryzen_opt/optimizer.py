"""``optimize(model)`` and ``KernelOptimizer``: measured, verified kernel selection.

For every site the model has (Linear layers, with the following GELU fused where the
model's structure makes that certain; LayerNorm; attention), every available backend runs
on the site's real inputs captured from typical runs of the model. A candidate whose output
differs from the original beyond the dtype tolerance is rejected ("error"); the others are
timed against the original, interleaved (:func:`ryzen_opt.timing.compare`), and kept only
if the whole bootstrap interval of the speed-up lies above 1 and the median reaches
``min_speedup``. The chosen backends are swapped in through replacement modules that keep
the original parameters and ``state_dict`` keys, and whole-model runs then check the
optimized model against the original once more. If nothing is faster, or the whole model is
wrong or slower, the model comes back unchanged and the report says why.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ryzen_opt.kernels import registry
from ryzen_opt.kernels.reference import error_floor
from ryzen_opt.kernels.registry import BackendError
from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.optimization import families, fastpaths, hf
from ryzen_opt.optimization.cache import DecisionCache, device_description, versions
from ryzen_opt.optimization.config import OptimizeConfig, dtype_name, parse_dtype
from ryzen_opt.optimization.examples import normalize_example
from ryzen_opt.optimization.fastpaths import generate as fast_generate
from ryzen_opt.optimization.fastpaths import hf_select
from ryzen_opt.optimization.modules import Route
from ryzen_opt.optimization.report import (
    CandidateResult,
    CaseResult,
    ModelCheck,
    OptimizationReport,
    SiteReport,
)
from ryzen_opt.optimization.sites import (
    Case,
    Run,
    Site,
    capture,
    find_targets,
    fused_activation,
    generic_runs,
    hf_attention_sites,
    hf_runs,
    layer_norm_site,
    linear_site,
    stm_attention_site,
    stm_runs,
)
from ryzen_opt.timing import PeakMemory, compare

__all__ = ["KernelOptimizer", "OptimizationPlan", "OptimizeConfig", "optimize"]

_OPS_OF_KIND = {
    "linear": ("matmul",),
    "layer_norm": ("layer_norm",),
    "attention": ("attention", "decode_attention"),
}


@dataclass
class OptimizationPlan:
    """What :meth:`KernelOptimizer.apply` will measure: sites, their cases and candidates.

    ``sites[i].cases[j].baseline`` is the original computation bound to captured inputs and
    ``candidates`` the backend calls on the same inputs; ``runs`` are the whole-model runs
    used for capture and for the final check against ``reference`` (an unmodified copy).
    """

    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    sites: list[Site]
    runs: list[Run]
    reference: nn.Module | None
    backends: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)
    hf_impl: str | None = None
    example: dict[str, Any] | None = None  # the normalised example_inputs (keyword form)

    def num_candidates(self) -> int:
        return sum(len(c.candidates) for s in self.sites for c in s.cases)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _parse_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device or its name, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    return dev


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


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
def _progress(config: OptimizeConfig, total: int):
    """A rich progress bar over the sites (on a terminal, or when ``config.progress``)."""
    show = config.progress if config.progress is not None else sys.stderr.isatty()
    if not show:
        yield lambda what: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cols = (
        TextColumn("optimize()"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*cols, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("", total=total)
        state = {"started": False}

        def advance(what: str) -> None:
            bar.update(task, advance=1 if state["started"] else 0, description=what)
            state["started"] = True

        yield advance
        bar.update(task, completed=total)


def weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Parameters are new objects over the same weight storage.

    The whole-model check's reference: optimizing replaces modules and may rebind a
    Parameter's ``.data`` (the fused CPU decode step moves weights into its arena), but
    never writes into the original storage, so the reference keeps the original values at
    no cost in memory (a deep copy doubled the weights: 10.1 GB peak for a 2.2 GB bf16
    Llama). Tied weights stay tied; buffers are copied.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():  # deduplicated: a tied weight maps once
        memo[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class KernelOptimizer:
    """Finds a model's matmuls, attention and norms and swaps in faster verified kernels.

    Args:
        config: settings (default ``OptimizeConfig()``).

    Example:
        >>> import torch
        >>> from ryzen_opt import KernelOptimizer, ModelConfig, SimpleTransformerModel
        >>> model = SimpleTransformerModel(ModelConfig(num_layers=1, max_seq_len=16))
        >>> opt = KernelOptimizer()
        >>> plan = opt.plan(model)          # sites, cases and candidates; no timing yet
        >>> model = opt.apply(model, plan)  # verified, timed, swapped in place
        >>> opt.report.changed in (True, False)
        True
    """

    def __init__(self, config: OptimizeConfig | None = None) -> None:
        if config is None:
            config = OptimizeConfig()
        if not isinstance(config, OptimizeConfig):
            raise TypeError(f"config must be an OptimizeConfig, got {type(config).__name__}")
        self.config = config
        self.report: OptimizationReport | None = None

    # ------------------------------------------------------------------ plan

    def _backends(self, device: torch.device, notes: list[str]) -> dict[str, list[str]]:
        """Per op, the allowed backends that run on ``device`` and whose toolchain works."""
        allowed = self.config.backends
        table = {op: registry.backends(op) for op in registry.OPS}
        if allowed is not None:
            known = sorted({n for names in table.values() for n in names})
            unknown = [b for b in allowed if b not in known]
            if unknown:
                raise ValueError(
                    f"config.backends names {unknown}, not registered here; "
                    f"registered: {known or 'none'}"
                )
        out: dict[str, list[str]] = {}
        for op, entries in table.items():
            out[op] = []
            for name, b in sorted(entries.items()):
                if allowed is not None and name not in allowed:
                    continue
                if device.type not in b.devices:
                    notes.append(
                        f"{op}/{name} not tried: runs on {'/'.join(b.devices)}, "
                        f"the model is on {device.type}"
                    )
                elif (why := b.available()) is not None:
                    notes.append(f"{op}/{name} not tried: {why}")
                else:
                    out[op].append(name)
        return out

    def plan(self, model: nn.Module, example_inputs: Any = None) -> OptimizationPlan:
        """Find the sites of ``model`` and capture their real inputs (nothing is timed yet).

        For a transformers model this points ``model`` at the routing attention function
        (which, without routes, computes exactly what the original did); :meth:`apply`
        restores the original implementation when no attention backend is kept.

        Args:
            model: the model to optimize (``apply`` will change this object).
            example_inputs: ``None`` (synthetic prefill/decode shapes from the model config),
                or, for every model kind, a tensor (the first forward argument), a tuple of
                positional forward arguments or a dict of keyword arguments.

        Returns:
            An :class:`OptimizationPlan` for :meth:`apply`.
        """
        _check_model(model)
        device, dtype = _model_device_dtype(model)
        example = normalize_example(model, example_inputs, device)
        notes = [f"backend module failed to import: {e}" for e in registry.import_errors().values()]
        backends = self._backends(device, notes)
        reference = weight_sharing_copy(model) if self.config.model_check else None
        is_hf = hf.is_hf_model(model)
        if isinstance(model, SimpleTransformerModel):
            runs = stm_runs(model, example, self.config, device)
        elif is_hf:
            runs = hf_runs(model, example, self.config, device)
        else:
            runs = generic_runs(model, example)

        hf_impl = None
        want_hf = (
            is_hf
            and "attention" in self.config.ops
            and (backends["attention"] or backends["decode_attention"])
        )
        if want_hf:
            impl = model.config._attn_implementation
            reason = hf.switch(model)
            if reason is None:
                hf_impl = impl
            else:
                notes.append(f"transformers attention not served: {reason}")

        targets = {
            p: (k, m)
            for p, (k, m) in find_targets(model, self.config.ops).items()
            if any(backends[op] for op in _OPS_OF_KIND[k])
        }
        was_training = model.training
        model.eval()
        try:
            seen, records = capture(
                model, runs, {p: m for p, (_, m) in targets.items()}, hf_impl is not None
            )
        except Exception as e:
            if hf_impl is not None:
                hf.restore(model, hf_impl)
            what = (
                "example_inputs could not be run through the model"
                if example_inputs is not None
                else "the synthetic runs (no example_inputs: a prefill of "
                f"OptimizeConfig.prefill_shape={self.config.prefill_shape}, decode steps at "
                f"decode_batches={self.config.decode_batches}) could not be run through the model"
            )
            msg = str(e) if len(str(e)) <= 500 else str(e)[:500] + "..."
            raise ValueError(f"{what}: {type(e).__name__}: {msg}") from e
        finally:
            model.train(was_training)

        sites: list[Site] = []
        for path, (kind, mod) in targets.items():
            if not seen[path]:
                continue
            allowed = tuple(n for op in _OPS_OF_KIND[kind] for n in backends[op])
            if kind == "linear":
                site = linear_site(
                    model, path, mod, seen[path], allowed, fused_activation(model, path)
                )
            elif kind == "layer_norm":
                site = layer_norm_site(model, path, mod, seen[path], allowed)
            else:
                site = stm_attention_site(model, path, mod, seen[path], allowed)
            if site.cases:
                sites.append(site)
        if hf_impl is not None:
            allowed = tuple(backends["attention"] + backends["decode_attention"])
            sites += hf_attention_sites(model, records, allowed)
        return OptimizationPlan(
            model, device, dtype, sites, runs, reference, backends, notes, hf_impl, example
        )

    # ------------------------------------------------------------------ measure

    def _evaluate(self, cand, case: Case, ref, site: Site, dev, cache, dev_desc, vers):
        backend = registry.backends(cand.op)[cand.backend]
        res = CandidateResult(cand.name, cand.op, "unsupported")
        reason = backend.why_not(dev.type, *cand.args)
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
        if not self._matches(res, out, ref, dev):
            return res
        self._time(
            res,
            cand.op,
            cand.name,
            site.baseline_id,
            case.key,
            case.baseline,
            cand.call,
            dev,
            cache,
            dev_desc,
            vers,
        )
        return res

    def _matches(self, res: CandidateResult, out, ref: torch.Tensor, dev) -> bool:
        """Record the error of ``out`` against ``ref``; ``False`` (status "error") if too large."""
        if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
            res.status = "error"
            res.detail = f"output shape {getattr(out, 'shape', None)} != {tuple(ref.shape)}"
            return False
        tol = self.config.tolerance_for(ref.dtype, dev)
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

    def _time(self, res, op, name, baseline_id, shape, baseline, call, dev, cache, dev_desc, vers):
        """Time ``call`` against ``baseline`` (or reuse the cached decision); set the verdict."""
        cfg = self.config
        key = DecisionCache.key(
            device=dev_desc,
            versions=vers,
            op=op,
            candidate=name,
            baseline=baseline_id,
            shape=shape,
            repeat=cfg.repeat,
            min_sample_s=cfg.min_sample_s,
            confidence=cfg.confidence,
        )
        hit = cache.get(key)
        if hit is None:
            with torch.no_grad():
                cmp = compare(
                    baseline,
                    call,
                    repeat=cfg.repeat,
                    warmup=cfg.warmup,
                    device=dev,
                    min_sample_s=cfg.min_sample_s,
                    confidence=cfg.confidence,
                )
            hit = {
                "speedup": cmp.speedup,
                "ci": [cmp.ci_low, cmp.ci_high],
                "baseline_s": cmp.baseline.median,
                "candidate_s": cmp.candidate.median,
                "n": cmp.baseline.n,
            }
            cache.put(key, hit)
        else:
            res.cached = True
        res.speedup, res.ci = hit["speedup"], tuple(hit["ci"])
        res.baseline_s, res.candidate_s = hit["baseline_s"], hit["candidate_s"]
        faster = res.ci[0] > 1.0 and res.speedup >= cfg.min_speedup
        res.status = "faster" if faster else "slower"
        if not faster:
            res.detail = (
                f"{res.speedup:.2f}x, CI [{res.ci[0]:.2f}, {res.ci[1]:.2f}]"
                f" (needs CI > 1 and >= {cfg.min_speedup:g}x)"
            )

    def _decide(self, site: Site, results: list[tuple[Case, CaseResult]], dev, dtype):
        """Per case label: the backend faster at every shape of it (best geometric mean)."""
        routes: list[Route] = []
        chosen: dict[str, str] = {}
        for label in dict.fromkeys(c.label for c, _ in results):
            group = [(c, r) for c, r in results if c.label == label]
            names = [cand.name for cand in group[0][0].candidates]
            best, best_score = None, 0.0
            for name in names:
                hits = [
                    next((x for x in r.candidates if x.backend == name), None) for _, r in group
                ]
                if any(h is None or h.status != "faster" for h in hits):
                    continue
                score = math.exp(sum(math.log(h.speedup) for h in hits) / len(hits))
                if score > best_score:
                    best, best_score = name, score
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
                    dev.type,
                    dtype_name(dtype),
                    bounds,
                    cand.packed,
                )
            )
            chosen[label] = best
        return routes, chosen

    # ------------------------------------------------------------------ fast paths

    def _fast_paths(self, plan, model, cache, dev_desc, vers, report):
        """Verify and time the model-level fast paths; the winners as :class:`FastPaths`."""
        cfg = self.config
        if not isinstance(model, SimpleTransformerModel) or cfg.fast_paths == ():
            return [], None
        dev = plan.device
        names = fastpaths.FAST_PATHS if cfg.fast_paths is None else cfg.fast_paths
        # The decision depends on what the model runs now (kernel swaps included).
        swaps = sorted(f"{s.path}:{k}={v}" for s in report.sites for k, v in s.chosen.items())
        baseline_id = "SimpleTransformerModel[" + ",".join(swaps) + "]"
        reports, decode, prefill, measured_batches = [], [], {}, set()
        for kind in ("prefill", "decode"):
            runs = [r for r in plan.runs if r.label == kind]
            paths = [fastpaths.make_path(n) for n in names if fastpaths.make_path(n).kind == kind]
            if not runs or not paths:
                continue
            srep = SiteReport(
                "(whole model)", f"{kind} step", "model-level fast path: the whole step at once"
            )
            groups: dict[tuple, list[CaseResult]] = {}
            for run in runs:
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
                _sync(dev)
                crep = CaseResult(label, run.shape)
                for path in paths:
                    crep.candidates.append(
                        self._evaluate_path(
                            path, run, state, model, ref, baseline_id, cache, dev_desc, vers
                        )
                    )
                srep.cases.append(crep)
                groups.setdefault(group, []).append(crep)
            for group, creps in groups.items():
                best, best_score = None, 0.0
                for path in paths:
                    hits = [next(c for c in r.candidates if c.backend == path.name) for r in creps]
                    if any(h.status != "faster" for h in hits):
                        continue
                    score = math.exp(sum(math.log(h.speedup) for h in hits) / len(hits))
                    if score > best_score:
                        best, best_score = path, score
                if best is not None:
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
        # A batch between two measured ones runs the lower one's winner; none runs outside
        # the measured range.
        measured = sorted(measured_batches)
        won = dict(decode)
        ranges = []
        for i, b in enumerate(measured):
            if b in won:
                nxt = measured[i + 1] if i + 1 < len(measured) else None
                hi = nxt - 1 if nxt is not None and nxt in won else b
                ranges.append((b, hi, won[b]))
        return reports, fastpaths.FastPaths(ranges, prefill)

    def _decoder_paths(self, plan, model, cache, dev_desc, vers, report, t0) -> list:
        """The decode-loop paths of a Hugging Face decoder family: measured through
        ``generate`` (:mod:`ryzen_opt.optimization.fastpaths.hf_select`); the undo list."""
        cfg = self.config
        if not hf.is_hf_model(model) or cfg.fast_paths == ():
            return []
        fam, reason = families.find(model)
        if fam is None:
            return []
        if reason is not None:
            report.notes.append(
                f"{fam.__name__.rsplit('.', 1)[-1]} decode paths: not used: {reason}"
            )
            return []
        if self._over_budget(t0):
            report.notes.append(self._budget_note("the decoder fast paths"))
            return []
        layout = fam.layout(model)
        swaps = sorted(f"{s.path}:{k}={v}" for s in report.sites for k, v in s.chosen.items())
        baseline_id = f"{type(model).__name__}[" + ",".join(swaps) + "]"
        budget = cfg.time_budget_s

        def left() -> float:
            return math.inf if budget is None else budget - (time.perf_counter() - t0)

        srep, routes, shared = hf_select.select(
            model, layout, plan.example, cfg, cache, dev_desc, vers, baseline_id, left
        )
        report.sites.append(srep)
        if not routes:
            return []
        report.notes.append(
            "generate: " + "; ".join(f"batch {lo}-{hi}: {name}" for lo, hi, name in routes)
        )
        return [fast_generate.install(model, layout, routes, shared)]

    def _evaluate_path(self, path, run, state, model, ref, baseline_id, cache, dev_desc, vers):
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
                    ok = self._matches(res, out, ref, dev)
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
                    ok = self._matches(res, out, ref, dev)
                    if ok and p + 1 < model.config.max_seq_len:
                        nxt = ref[:, -1].argmax(-1, keepdim=True)
                        ref2 = model(nxt, model(ids, tup)[1])[0]
                        out2 = path(model, nxt, after, p + 1)[0]
                        ok = self._matches(res, out2, ref2, dev)
                    del out, after  # a live longer view would make every timed step copy

                    def call(m=model, x=ids, c=static, n=p):
                        return path(m, x, c, n)[0]

            _sync(dev)
        except Exception as e:
            res.status, res.detail = "failed", f"{type(e).__name__}: {e}"
            return res
        if not ok:
            return res
        self._time(
            res,
            op,
            path.name,
            baseline_id,
            run.shape,
            lambda: run.call(model, state),
            call,
            dev,
            cache,
            dev_desc,
            vers,
        )
        return res

    # ------------------------------------------------------------------ apply

    def apply(
        self, model: nn.Module, plan: OptimizationPlan | None = None, example_inputs: Any = None
    ) -> nn.Module:
        """Measure every candidate of ``plan``, swap in the winners, check the whole model.

        Changes ``model`` in place (``optimize()`` passes a copy) and returns it; the
        report is in ``self.report`` and on ``model.optimization_report``.

        Args:
            model: the model ``plan`` was made for.
            plan: from :meth:`plan` (made here when ``None``).
            example_inputs: used only when ``plan`` is ``None``.

        Returns:
            ``model``, optimized where a verified faster backend exists, else unchanged.
        """
        _check_model(model)
        t0 = time.perf_counter()
        if plan is None:
            plan = self.plan(model, example_inputs)
        elif not isinstance(plan, OptimizationPlan) or plan.model is not model:
            raise ValueError("plan must be the OptimizationPlan made by plan() for this model")
        cfg = self.config
        dev, dtype = plan.device, plan.dtype
        cache = DecisionCache(cfg.resolved_cache_dir, cfg.use_cache)
        dev_desc, vers = device_description(dev), versions()
        report = OptimizationReport(
            type(model).__name__,
            str(dev),
            dtype_name(dtype),
            backends=plan.backends,
            notes=list(plan.notes),
            environment={"device": dev_desc, "versions": vers},
            config=cfg.to_dict(),
        )
        report.notes += cache.notes
        undo: list[Callable[[], None]] = []
        was_training = model.training
        model.eval()
        try:
            with _progress(cfg, len(plan.sites) + 1) as advance:
                for site in plan.sites:
                    advance(f"{site.kind} {site.path}")
                    if self._over_budget(t0):
                        report.notes.append(self._budget_note(site.path))
                        continue
                    srep, routes = self._measure_site(site, dev, dtype, cache, dev_desc, vers)
                    if routes:
                        undo.append(site.install(model, routes))
                    report.sites.append(srep)
                advance("whole-model fast paths")
                if self._over_budget(t0):
                    fast_reports, paths = [], None
                    if isinstance(model, SimpleTransformerModel) and cfg.fast_paths != ():
                        report.notes.append(self._budget_note("the whole-model fast paths"))
                else:
                    fast_reports, paths = self._fast_paths(
                        plan, model, cache, dev_desc, vers, report
                    )
            report.sites += fast_reports
            if paths is not None:
                undo.append(fastpaths.install(model, paths))
                report.notes.append("fast paths: " + "; ".join(paths.describe()))
            report.changed = bool(undo)
            if undo and cfg.model_check and plan.reference is not None:
                failure = self._check_model(plan, model, report)
                if failure:
                    for u in reversed(undo):
                        u()
                    undo.clear()
                    report.changed = False
                    report.notes.append(f"reverted every swap: {failure}")
                    for s in report.sites:
                        if s.chosen:
                            s.note = f"reverted ({failure})"
                            s.chosen = {}
            # A decoder's decode loop is measured through generate() itself, against the
            # model as the check left it: its own end-to-end comparison is its check.
            decoder_undo = self._decoder_paths(plan, model, cache, dev_desc, vers, report, t0)
            undo += decoder_undo
            report.changed = report.changed or bool(decoder_undo)
        finally:
            model.train(was_training)
            if plan.hf_impl is not None and not any(
                s.kind == "attention" and s.chosen for s in report.sites
            ):
                hf.restore(model, plan.hf_impl)
            # A cache that cannot be written costs a warning and a note, never the result.
            unsaved = cache.save()
            if unsaved is not None:
                report.notes.append(unsaved)
        if not report.changed and not plan.sites:
            report.notes.append("no site had an available backend candidate")
        report.elapsed_s = time.perf_counter() - t0
        self.report = report
        model.optimization_report = report
        return model

    def _measure_site(self, site: Site, dev, dtype, cache, dev_desc, vers):
        """Verify and time every candidate of every case of ``site``; its report and routes."""
        srep = SiteReport(site.path, site.kind, site.detail)
        results = []
        for case in site.cases:
            with torch.no_grad():
                ref = case.baseline()
            _sync(dev)
            crep = CaseResult(case.label, case.shape)
            for cand in case.candidates:
                crep.candidates.append(
                    self._evaluate(cand, case, ref, site, dev, cache, dev_desc, vers)
                )
            srep.cases.append(crep)
            results.append((case, crep))
        routes, srep.chosen = self._decide(site, results, dev, dtype)
        return srep, routes

    def _over_budget(self, t0: float) -> bool:
        budget = self.config.time_budget_s
        return budget is not None and time.perf_counter() - t0 > budget

    def _budget_note(self, what: str) -> str:
        return (
            f"{what}: not measured, the time budget of {self.config.time_budget_s:g} s "
            "(OptimizeConfig.time_budget_s) was spent; it keeps the original code"
        )

    def _check_model(
        self, plan: OptimizationPlan, model: nn.Module, report: OptimizationReport
    ) -> str | None:
        """Whole-model check of every run; the first failure's description, or ``None``."""
        cfg = self.config
        ref_model = plan.reference
        was = ref_model.training
        ref_model.eval()
        failure = None
        timed: set[str] = set()
        try:
            with torch.no_grad():
                for run in plan.runs:
                    s_ref, s_opt = run.setup(ref_model), run.setup(model)
                    out_ref, out_opt = run.call(ref_model, s_ref), run.call(model, s_opt)
                    tol = cfg.tolerance_for(out_ref.dtype, plan.device)
                    err, _ = _rel_error(out_opt, out_ref, tol)
                    check = ModelCheck(run.label, run.shape, err, tol)
                    # Time one run per label and batch (the longest cache for decode).
                    tkey = f"{run.label}:{run.shape.split(' ')[0]}"
                    later = [r for r in plan.runs if f"{r.label}:{r.shape.split(' ')[0]}" == tkey]
                    if tkey not in timed and run is later[-1]:
                        timed.add(tkey)
                        cmp = compare(
                            lambda r=run, s=s_ref: r.call(ref_model, s),
                            lambda r=run, s=s_opt: r.call(model, s),
                            repeat=cfg.repeat,
                            warmup=cfg.warmup,
                            device=plan.device,
                            min_sample_s=cfg.min_sample_s,
                            confidence=cfg.confidence,
                        )
                        check.speedup, check.ci = cmp.speedup, (cmp.ci_low, cmp.ci_high)
                    if err > tol:
                        check.verdict = "error"
                        failure = failure or f"{run.label} {run.shape}: relative error {err:.2e}"
                    elif check.ci is not None and check.ci[1] < 1.0:
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


def optimize(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    config: OptimizeConfig | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Return ``model`` with every op swapped for a faster verified backend where one exists.

    The original is left untouched (a deep copy is optimized) unless ``inplace=True``. The
    result carries ``optimization_report`` (:class:`OptimizationReport`); if no candidate
    was both within tolerance and faster, it is an unchanged copy and the report says so.

    Args:
        model: a ``SimpleTransformerModel``, a transformers decoder (GPT-2, Llama, Qwen2,
            ...), or any ``nn.Module`` (then ``example_inputs`` is required).
        example_inputs: ``None`` for synthetic typical shapes (prefill 16x128, one-token
            decode at batch 1 and 16); else the prompt as ``torch.export`` takes it: a
            tensor (the first forward argument, e.g. ``(batch, seq)`` token ids), a tuple
            of positional forward arguments (``(ids,)``) or a dict of keyword arguments
            (``{"input_ids": ids, "attention_mask": mask}``). A cache argument is refused:
            decode steps are measured after caches built from the prompt.
        device: move the model here first (``"cpu"``, ``"cuda"``, ...).
        dtype: cast the model first (``torch.float32``/``"bf16"``/``"fp16"``...).
        config: :class:`OptimizeConfig` (default settings when ``None``).
        inplace: optimize ``model`` itself instead of a copy.

    Returns:
        The optimized model (same class), with ``optimization_report``.

    Example:
        >>> import torch
        >>> from ryzen_opt import ModelConfig, SimpleTransformerModel, optimize
        >>> m = SimpleTransformerModel(ModelConfig(num_layers=1, max_seq_len=16)).eval()
        >>> fast = optimize(m)
        >>> print(fast.optimization_report.summary)  # doctest: +ELLIPSIS
        ...
    """
    _check_model(model)
    dev = _parse_device(device)
    dt = parse_dtype(dtype, "dtype")
    if config is None:
        config = OptimizeConfig()
    if not isinstance(config, OptimizeConfig):
        raise TypeError(f"config must be an OptimizeConfig, got {type(config).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    t0 = time.perf_counter()
    # What optimize() itself costs goes into the report; the CPU sampler's 20 ms period keeps
    # it out of the timings it brackets.
    mem_device = dev if dev is not None else _model_device_dtype(model)[0]
    with PeakMemory(mem_device, interval_s=0.02) as mem:
        work = model if inplace else copy.deepcopy(model)
        if dev is not None or dt is not None:
            work = work.to(device=dev, dtype=dt)
        opt = KernelOptimizer(config)
        out = opt.apply(work, opt.plan(work, example_inputs))
    out.optimization_report.peak_memory_bytes = mem.peak_bytes
    out.optimization_report.elapsed_s = time.perf_counter() - t0
    return out
