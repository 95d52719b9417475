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

This module is the front door: :meth:`KernelOptimizer.plan` finds the sites and captures
their inputs, :meth:`KernelOptimizer.apply` hands them to the measuring engine
(:mod:`ryzen_opt.optimization.engine`), installs the winners and records the report.

What optimizing costs is bounded: sites of one signature (the layers of a decoder stack) are
measured once and the others take that decision (the report says "reused from <path>"), the
synthetic prefill is sized to the model (``OptimizeConfig.prefill_shape_for``), the working
copy shares the original's weights, and ``time_budget_s`` holds every measurement, with the
whole-model check's estimated share set aside for it. The report records the seconds per
phase, the total and the peak memory.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ryzen_opt.kernels import registry
from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.optimization import families, fastpaths, hf
from ryzen_opt.optimization.cache import DecisionCache
from ryzen_opt.optimization.config import OptimizeConfig, dtype_name, parse_dtype
from ryzen_opt.optimization.engine import (
    Engine,
    check_cost_s,
    check_whole_model,
    progress_bar,
    weight_sharing_copy,
)
from ryzen_opt.optimization.examples import normalize_example
from ryzen_opt.optimization.fastpaths import generate as fast_generate
from ryzen_opt.optimization.fastpaths import hf_select
from ryzen_opt.optimization.report import OptimizationReport, SiteReport
from ryzen_opt.optimization.sites import (
    Run,
    Site,
    capture,
    find_targets,
    fused_activation,
    generic_runs,
    hf_attention_sites,
    hf_last_logits_only,
    hf_runs,
    layer_norm_site,
    linear_site,
    mark_reuse,
    module_signature,
    stm_attention_site,
    stm_runs,
)
from ryzen_opt.timing import PeakMemory

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
    used for capture and for the final check against ``reference`` (an unmodified copy that
    shares the weights). A site whose ``reuse_of`` names an earlier site of the same
    signature has no cases: it takes that site's decision. :meth:`KernelOptimizer.apply`
    releases each site's captured inputs once it is measured. ``prefill_shape`` is the
    synthetic prefill's ``(batch, seq)`` (``None`` with an example); ``elapsed_s`` what
    making the plan took (counted against the time budget).
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
    prefill_shape: tuple[int, int] | None = None
    elapsed_s: float = 0.0

    def num_candidates(self) -> int:
        return sum(len(c.candidates) for s in self.sites for c in s.cases)

    def measured_sites(self) -> list[Site]:
        """The sites that are measured (the others reuse one of these decisions)."""
        return [s for s in self.sites if s.reuse_of is None]


def _require_module(model: Any) -> None:
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


def _params_and_bytes(model: nn.Module) -> tuple[int, int]:
    """Distinct parameters (a tied weight once): their count and their bytes."""
    seen: set[int] = set()
    n = nbytes = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
            nbytes += p.numel() * p.element_size()
    return n, nbytes


def drop_slower_routes(paths, checks, sites=()) -> list[str] | None:
    """Remove from ``paths`` (installed fast paths) the routes that served the whole-model runs
    in ``checks`` found slower than the original; what was removed, or ``None`` when a
    failure is not a slower run that a route served (an error, or a shape no route serves:
    then the caller reverts every swap). The fast-path site reports in ``sites`` lose the
    dropped choices, with a note."""
    dropped: list[str] = []
    for c in checks:
        if c.verdict == "error":
            return None
        if c.verdict != "slower":
            continue
        b = int(c.shape.split("x")[0])
        if c.case == "decode":
            hit = [r for r in paths.decode if r[0] <= b <= r[1]]
            if not hit:
                return None
            for r in hit:
                paths.decode.remove(r)
                dropped.append(f"decode batch {r[0]}-{r[1]}: {r[2].name} ({c.speedup:.2f}x)")
                for site in sites:
                    if site.chosen.pop(f"decode b{r[0]}", None) is not None:
                        why = f"whole model slower at {c.shape} ({c.speedup:.2f}x)"
                        site.note = (site.note + "; " if site.note else "") + f"dropped: {why}"
        elif c.case == "prefill":
            t = int(c.shape.split("x")[1].split(" ")[0])
            path = paths.prefill.pop((b, t), None)
            if path is None:
                return None
            dropped.append(f"prefill {b}x{t}: {path.name} ({c.speedup:.2f}x)")
        else:
            return None
    return dropped or None


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
        _require_module(model)
        t0 = time.perf_counter()
        device, dtype = _model_device_dtype(model)
        example = normalize_example(model, example_inputs, device)
        notes = [f"backend module failed to import: {e}" for e in registry.import_errors().values()]
        backends = self._backends(device, notes)
        reference = weight_sharing_copy(model) if self.config.model_check else None
        is_hf = hf.is_hf_model(model)
        prefill = self._prefill_shape(model, device, is_hf) if example is None else None
        if isinstance(model, SimpleTransformerModel):
            runs = stm_runs(model, example, self.config, device, prefill)
        elif is_hf:
            runs = hf_runs(model, example, self.config, device, prefill)
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
        signatures = {
            p: module_signature(k, m, fused_activation(model, p) if k == "linear" else None)
            for p, (k, m) in targets.items()
        }
        was_training = model.training
        model.eval()
        try:
            seen, records = capture(
                model,
                runs,
                {p: m for p, (_, m) in targets.items()},
                hf_impl is not None,
                signatures,
                device,
            )
        except Exception as e:
            if hf_impl is not None:
                hf.restore(model, hf_impl)
            what = (
                "example_inputs could not be run through the model"
                if example_inputs is not None
                else "the synthetic runs (no example_inputs: a prefill of "
                f"{prefill} (OptimizeConfig.prefill_shape), decode steps at "
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
        del seen, records
        mark_reuse(sites)
        return OptimizationPlan(
            model,
            device,
            dtype,
            sites,
            runs,
            reference,
            backends,
            notes,
            hf_impl,
            example,
            prefill,
            time.perf_counter() - t0,
        )

    def _prefill_shape(self, model: nn.Module, device: torch.device, is_hf: bool):
        """The synthetic prefill's shape for this model (``OptimizeConfig.prefill_shape_for``)."""
        params, nbytes = _params_and_bytes(model)
        cfg = getattr(model, "config", None)
        vocab = getattr(cfg, "vocab_size", 0) or 0
        _, dtype = _model_device_dtype(model)
        return self.config.prefill_shape_for(
            params,
            device,
            logit_row_bytes=vocab * torch.finfo(dtype).bits // 8,
            last_logits_only=is_hf and hf_last_logits_only(model),
            weight_bytes=nbytes,
        )

    # ------------------------------------------------------------------ apply

    def apply(
        self, model: nn.Module, plan: OptimizationPlan | None = None, example_inputs: Any = None
    ) -> nn.Module:
        """Measure every candidate of ``plan``, swap in the winners, check the whole model.

        Changes ``model`` in place (``optimize()`` passes a copy) and returns it; the
        report is in ``self.report`` and on ``model.optimization_report``. Each measured
        site's captured inputs are released (``plan`` cannot be applied twice).

        Order: a Hugging Face decoder's decode loop (through ``generate``), then one site per
        signature (the others take its decision), the model-level fast paths, the
        whole-model check. ``config.time_budget_s`` counts from the start of :meth:`plan`;
        a step starts only while its estimate fits in what is left, the check's share kept
        aside while sites are measured. Swaps the check has no time left for are undone.

        Args:
            model: the model ``plan`` was made for.
            plan: from :meth:`plan` (made here when ``None``).
            example_inputs: used only when ``plan`` is ``None``.

        Returns:
            ``model``, optimized where a verified faster backend exists, else unchanged.
        """
        _require_module(model)
        # The budget counts from the start of plan() (its capture runs are part of the cost).
        t0 = time.perf_counter()
        if plan is None:
            plan = self.plan(model, example_inputs)
        elif not isinstance(plan, OptimizationPlan) or plan.model is not model:
            raise ValueError("plan must be the OptimizationPlan made by plan() for this model")
        else:
            t0 -= plan.elapsed_s
        cfg = self.config
        dev, dtype = plan.device, plan.dtype
        cache = DecisionCache(cfg.resolved_cache_dir, cfg.use_cache)
        engine = Engine(cfg, dev, dtype, cache)
        report = OptimizationReport(
            type(model).__name__,
            str(dev),
            dtype_name(dtype),
            backends=plan.backends,
            notes=list(plan.notes),
            environment={"device": engine.device_description, "versions": engine.versions},
            config=cfg.to_dict(),
        )
        report.phases["plan"] = plan.elapsed_s
        report.notes += cache.notes
        undo: list[Callable[[], None]] = []
        was_training = model.training
        budget = cfg.time_budget_s

        def left() -> float:
            return math.inf if budget is None else budget - (time.perf_counter() - t0)

        check = cfg.model_check and plan.reference is not None
        check_s = check_cost_s(cfg, plan.runs) if check else 0.0
        phase = _Phases(report)
        decoder = self._decoder_setup(plan, model, report)
        measured_sites = plan.measured_sites()
        n_decoder = (
            hf_select.steps(model, decoder, plan.example, cfg, self._prompt_len(plan))
            if decoder is not None
            else 0
        )
        model.eval()
        try:
            with progress_bar(cfg, n_decoder + len(measured_sites) + 2) as advance:
                # A Hugging Face decoder's decode loop goes first: generation spends its
                # time there, so the time budget goes to it before the per-op sites. It is
                # measured through generate() itself against the original (its own
                # end-to-end check), and the whole-model check below never reverts it.
                with phase("decoder paths"):
                    decoder_undo = self._decoder_paths(
                        plan, model, engine, report, decoder, left, advance
                    )
                with phase("sites"):
                    undo += self._sites(plan, model, engine, report, left, check_s, advance)
                advance("whole-model fast paths")
                with phase("fast paths"):
                    if left() <= check_s:
                        fast_reports, paths = [], None
                        if isinstance(model, SimpleTransformerModel) and cfg.fast_paths != ():
                            self._skip(report, "the whole-model fast paths", left(), check_s)
                    else:
                        fast_reports, paths = engine.fast_paths(model, plan.runs, report.sites)
                report.sites += fast_reports
                paths_undo = None
                if paths is not None:
                    paths_undo = fastpaths.install(model, paths)
                    undo.append(paths_undo)
                    report.notes.append("fast paths: " + "; ".join(paths.describe()))
                report.changed = bool(undo)
                advance("whole-model check")
                failure = None
                if undo and check:
                    if left() < 0.5 * check_s:
                        failure = (
                            f"no time left for the whole-model check (about {check_s:.0f} s;"
                            f" OptimizeConfig.time_budget_s={budget:g})"
                        )
                        report.unmeasured.append("the whole-model check")
                    else:
                        with phase("model check"):
                            k, narrowed = len(report.model_checks), False
                            failure = check_whole_model(
                                cfg, plan.reference, model, plan.runs, plan.device, report
                            )
                            # A fast path slower on some runs loses only the routes serving
                            # them, and the model is checked again (twice at most).
                            for _ in range(2):
                                if not failure or paths_undo is None or left() < 0.5 * check_s:
                                    break
                                dropped = drop_slower_routes(
                                    paths, report.model_checks[k:], report.sites
                                )
                                if not dropped:
                                    break
                                report.notes.append(
                                    "dropped the fast paths of the runs the whole model was "
                                    f"slower on: {'; '.join(dropped)}; checked again"
                                )
                                if not paths.decode and not paths.prefill:
                                    undo.remove(paths_undo)
                                    paths_undo()
                                    paths_undo = None
                                if not undo:
                                    failure = None
                                    break
                                k = len(report.model_checks)
                                failure = check_whole_model(
                                    cfg, plan.reference, model, plan.runs, plan.device, report
                                )
                                narrowed = True
                            if not failure and narrowed and paths_undo is not None:
                                report.notes.append(
                                    "fast paths kept: " + "; ".join(paths.describe())
                                )
                            report.changed = bool(undo)
                if failure:
                    for u in reversed(undo):
                        u()
                    undo.clear()
                    report.changed = False
                    report.notes.append(f"reverted every swap: {failure}")
                    for s in report.sites:
                        if s.chosen and s.kind != "generate":
                            s.note = (s.note + "; " if s.note else "") + f"reverted ({failure})"
                            s.chosen = {}
            # The decode path went in before the per-op swaps (it is measured first); those
            # wrap the same parameters and passed their checks, so the installed generate
            # takes the modules as they now are (else it would see them as changed by the
            # user and run the original generate on every call).
            if decoder_undo:
                fast_generate.adopt_modules(model)
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
        self._budget_hint(report, dev)
        report.elapsed_s = time.perf_counter() - t0
        self.report = report
        model.optimization_report = report
        return model

    def _sites(self, plan, model, engine: Engine, report, left, reserve: float, advance) -> list:
        """Measure one site per signature (while more than ``reserve`` seconds are left),
        give every site its decision in model order; the undo list."""
        decisions: dict[str, tuple[SiteReport, list]] = {}
        followers: dict[str, int] = {}
        for site in plan.sites:
            if site.reuse_of is not None:
                followers[site.reuse_of] = followers.get(site.reuse_of, 0) + 1
        for site in plan.measured_sites():
            advance(f"{site.kind} {site.path}")
            if left() <= reserve:
                more = followers.get(site.path, 0)
                what = site.path + (f" (and {more} sites of its signature)" if more else "")
                self._skip(report, what, left(), reserve)
                site.release()
                continue
            decisions[site.path] = engine.measure_site(site)
            site.release()  # its captured inputs and packed weights
        undo = []
        for site in plan.sites:
            got = decisions.get(site.reuse_of or site.path)
            if got is None:
                continue
            srep, routes = got
            if site.reuse_of is not None:
                srep = SiteReport(
                    site.path,
                    site.kind,
                    site.detail,
                    list(srep.cases),
                    dict(srep.chosen),
                    f"reused from {site.reuse_of}",
                )
            if routes:
                undo.append(site.install(model, routes))
            report.sites.append(srep)
        return undo

    def _decoder_setup(self, plan, model, report):
        """The decoder layout if a Hugging Face decode-loop family serves ``model`` and its
        paths are wanted, else ``None`` (with a note saying why not, where there is one)."""
        if not hf.is_hf_model(model) or self.config.fast_paths == ():
            return None
        fam, reason = families.find(model)
        if fam is None:
            return None
        if reason is not None:
            report.notes.append(
                f"{fam.__name__.rsplit('.', 1)[-1]} decode paths: not used: {reason}"
            )
            return None
        return fam.layout(model)

    @staticmethod
    def _prompt_len(plan) -> int:
        return plan.prefill_shape[1] if plan.prefill_shape else hf_select.MAX_PROMPT

    def _decoder_paths(self, plan, model, engine: Engine, report, layout, left, advance) -> list:
        """The decode-loop paths of a Hugging Face decoder family: measured through
        ``generate`` (:meth:`Engine.decoder_paths`); the undo list."""
        if layout is None:
            return []
        if left() <= 0:
            self._skip(report, "the decoder fast paths")
            return []
        srep, routes, shared = engine.decoder_paths(
            model,
            layout,
            plan.example,
            report.sites,
            left,
            prompt_len=self._prompt_len(plan),
            progress=advance,
        )
        report.sites.append(srep)
        if not routes:
            return []
        report.notes.append(
            "generate: " + "; ".join(f"batch {lo}-{hi}: {name}" for lo, hi, name in routes)
        )
        return [fast_generate.install(model, layout, routes, shared)]

    def _skip(self, report, what: str, left: float = 0.0, reserve: float = 0.0) -> None:
        """``what`` is not measured for the time budget: a note says why, and
        ``report.unmeasured`` counts it."""
        why = (
            "was spent"
            if left <= 0
            else f"had {left:.0f} s left, kept for the whole-model check (about {reserve:.0f} s)"
        )
        report.notes.append(
            f"{what}: not measured, the time budget of {self.config.time_budget_s:g} s "
            f"(OptimizeConfig.time_budget_s) {why}; it keeps the original code"
        )
        report.unmeasured.append(what)

    def _budget_hint(self, report, device: torch.device) -> None:
        """When the budget left something unmeasured, a note on how to measure it."""
        skipped = report.not_measured()
        if not skipped:
            return
        shown = "; ".join(skipped[:6]) + (
            f"; and {len(skipped) - 6} more" if len(skipped) > 6 else ""
        )
        ahead = (
            " (`python -m ryzen_opt.kernels.numba` compiles every Numba kernel ahead)"
            if device.type == "cpu"
            else ""
        )
        kept = ", and so do the decisions it measured" if self.config.use_cache else ""
        report.notes.append(
            f"not measured within the time budget of {self.config.time_budget_s:g} s: {shown}."
            " To measure them: raise OptimizeConfig.time_budget_s (None: no limit), or call"
            f" optimize() again: the kernels this call compiled stay cached on disk{kept}{ahead}"
        )


class _Phases:
    """``with phases("name"):`` adds the block's seconds to ``report.phases["name"]``."""

    def __init__(self, report: OptimizationReport) -> None:
        self.report = report

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            ph = self.report.phases
            ph[name] = ph.get(name, 0.0) + time.perf_counter() - t0


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

    The original is left untouched unless ``inplace=True``: a copy is optimized. The copy
    **shares the original's weight storage** (its Parameters and buffers are new objects over
    the same memory; modules, configs and everything else are copied), so optimizing costs
    no second copy of the weights. What that means for you:

    * in-place edits of the optimized model's weights (``p.data.mul_()``, ``p.copy_()``, an
      optimizer step when you train it, ``load_state_dict`` into it) show in the original,
      and the other way round; rebinding (``module.weight = nn.Parameter(...)``,
      ``p.data = ...``) does not;
    * ``optimize()`` itself never writes into the weights, and running the optimized model
      (``forward``, ``generate``) leaves the original's ``state_dict`` values as they were;
    * a swap that needs its weights in another layout (a packed copy for a kernel, the
      fused CPU decode step's arena) allocates its own copy and reads that;
    * ``.to(device/dtype)`` of either model converts that model only;
    * for a fully independent copy, pass ``copy.deepcopy(model)`` with ``inplace=True``.

    The result carries ``optimization_report`` (:class:`OptimizationReport`); if no candidate
    was both within tolerance and faster, it is an unchanged copy and the report says so.
    The report records what ``optimize()`` itself cost: ``elapsed_s``, the seconds per phase
    (``phases``) and ``peak_memory_bytes`` above what the process held at the call.

    Args:
        model: a ``SimpleTransformerModel``, a transformers decoder (GPT-2, Llama, Qwen2,
            ...), or any ``nn.Module`` (then ``example_inputs`` is required).
        example_inputs: ``None`` for synthetic typical shapes (a prefill of 16x128 tokens,
            fewer for a large model on the CPU: ``OptimizeConfig.prefill_shape_for``;
            one-token decode at batch 1 and 16); else the prompt as ``torch.export`` takes
            it: a tensor (the first forward argument, e.g. ``(batch, seq)`` token ids), a
            tuple of positional forward arguments (``(ids,)``) or a dict of keyword
            arguments (``{"input_ids": ids, "attention_mask": mask}``). A cache argument is
            refused: decode steps are measured after caches built from the prompt.
        device: move the model here first (``"cpu"``, ``"cuda"``, ...).
        dtype: cast the model first (``torch.float32``/``"bf16"``/``"fp16"``...).
        config: :class:`OptimizeConfig` (default settings when ``None``; its
            ``time_budget_s``, 60 s by default, bounds the measuring).
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
    _require_module(model)
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
        work = model if inplace else weight_sharing_copy(model)
        if dev is not None or dt is not None:
            work = work.to(device=dev, dtype=dt)
        copy_s = time.perf_counter() - t0
        opt = KernelOptimizer(config)
        plan = opt.plan(work, example_inputs)
        plan.elapsed_s += copy_s  # the budget counts from here
        out = opt.apply(work, plan)
        del plan  # the captured inputs and the reference, before the peak is read
    report = out.optimization_report
    report.peak_memory_bytes = mem.peak_bytes
    report.elapsed_s = time.perf_counter() - t0
    report.phases = {"copy": copy_s, **report.phases}
    report.phases["plan"] = report.phases.get("plan", 0.0) - copy_s
    return out
