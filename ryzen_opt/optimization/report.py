"""``OptimizationReport``: what ``optimize()`` tried per site, what it kept, and why.

Printable as a rich table (``print(report)`` or ``rich.print(report)``), saved as JSON
(:meth:`OptimizationReport.to_json`) and markdown (:meth:`OptimizationReport.to_markdown`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ryzen_opt.optimization.cache import atomic_write_text

# Why a candidate was not kept at one measured shape.
REASONS = ("unsupported", "unmeasured", "failed", "error", "slower")


@dataclass
class CandidateResult:
    """One backend at one measured shape of one site.

    ``status`` is ``"faster"`` (verified and faster beyond the noise), or one of the
    rejection reasons: ``"unsupported"`` (the backend declined the input), ``"unmeasured"``
    (what is left of ``OptimizeConfig.time_budget_s`` would not cover it), ``"failed"`` (it
    raised), ``"error"`` (output differs beyond the dtype tolerance), ``"slower"`` (not
    faster beyond the noise, or below ``min_speedup``).
    """

    backend: str
    op: str
    status: str
    detail: str = ""
    rel_error: float | None = None
    max_abs_error: float | None = None
    speedup: float | None = None
    ci: tuple[float, float] | None = None
    baseline_s: float | None = None
    candidate_s: float | None = None
    cached: bool = False

    def record_timing(self, hit: dict[str, Any], min_speedup: float) -> bool:
        """Take a timing (:meth:`DecisionCache.record`) and set the verdict: "faster" only if
        the whole interval of the speed-up lies above 1 and the median reaches
        ``min_speedup``, else "slower". Returns whether it was faster."""
        self.speedup, self.ci = hit["speedup"], tuple(hit["ci"])
        self.baseline_s, self.candidate_s = hit["baseline_s"], hit["candidate_s"]
        faster = self.ci[0] > 1.0 and self.speedup >= min_speedup
        self.status = "faster" if faster else "slower"
        return faster

    def slower_detail(self, min_speedup: float) -> str:
        """Why a timed candidate was not kept, in numbers."""
        return (
            f"{self.speedup:.2f}x, CI [{self.ci[0]:.2f}, {self.ci[1]:.2f}]"
            f" (needs CI > 1 and >= {min_speedup:g}x)"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["ci"] = list(self.ci) if self.ci else None
        return d


@dataclass
class CaseResult:
    """All candidates at one measured shape (``case`` is ``prefill``/``decode``/...)."""

    case: str
    shape: str
    candidates: list[CandidateResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "shape": self.shape,
            "candidates": [c.to_dict() for c in self.candidates],
        }


@dataclass
class SiteReport:
    """One place in the model (``path``) and what was decided for it per case."""

    path: str
    kind: str
    detail: str
    cases: list[CaseResult] = field(default_factory=list)
    chosen: dict[str, str] = field(default_factory=dict)  # case -> backend
    note: str = ""
    # What the time budget left unmeasured here ("numba_decoder at batch 16"), also in the
    # candidates' details and ``note``; counted by OptimizationReport.not_measured().
    unmeasured: list[str] = field(default_factory=list)

    def best(self, case: str) -> CandidateResult | None:
        """The chosen backend's result with the lowest speed-up over ``case``'s shapes."""
        backend = self.chosen.get(case)
        hits = [
            c
            for r in self.cases
            if r.case == case
            for c in r.candidates
            if c.backend == backend and c.speedup is not None
        ]
        return min(hits, key=lambda c: c.speedup) if hits else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "detail": self.detail,
            "chosen": dict(self.chosen),
            "note": self.note,
            "unmeasured": list(self.unmeasured),
            "cases": [c.to_dict() for c in self.cases],
        }


@dataclass
class ModelCheck:
    """Whole model, original vs optimized, on one run (prefill or one decode step)."""

    case: str
    shape: str
    rel_error: float
    tolerance: float
    speedup: float | None = None
    ci: tuple[float, float] | None = None
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["ci"] = list(self.ci) if self.ci else None
        return d


@dataclass
class OptimizationReport:
    """Per-site decisions, rejected candidates with reasons, and the whole-model check.

    Example:
        >>> from ryzen_opt.optimization.report import OptimizationReport
        >>> r = OptimizationReport(model="M", device="cpu", dtype="float32")
        >>> r.changed
        False
    """

    model: str
    device: str
    dtype: str
    sites: list[SiteReport] = field(default_factory=list)
    model_checks: list[ModelCheck] = field(default_factory=list)
    backends: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Whole parts the time budget left unmeasured (a site, the fast paths); per-site ones are
    # in SiteReport.unmeasured. See not_measured().
    unmeasured: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    changed: bool = False
    # What optimize() itself cost: seconds in all, seconds per phase (copy, plan: finding the
    # sites and capturing their inputs, decoder paths, sites, fast paths, model check), and
    # the peak memory above what the process held when it started (CUDA: max allocated on
    # the model's device; CPU: resident set size), in bytes.
    elapsed_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    # Who made the report, for its titles: optimize() or optimize_training(), which shares
    # this report (a site per part of the training step).
    tool: str = "optimize()"

    def __post_init__(self) -> None:
        # The CPU kernels' speed depends on the vector ISA (AVX2+FMA vs AVX-512 hosts of one
        # cloud family differ), so every report records the one it was measured on.
        if "cpu_isa" not in self.environment:
            from ryzen_opt.cpu_info import cpu_isa

            self.environment["cpu_isa"] = cpu_isa()

    @property
    def summary(self) -> str:
        """One line: what changed, or why the model came back unchanged; and what
        ``optimize()`` cost (:attr:`cost`)."""
        return f"{self._outcome}; {self.cost}"

    def not_measured(self) -> list[str]:
        """Everything the time budget left unmeasured: whole parts, then each site's
        candidates or batch sizes (``"<site>: <what>"``)."""
        return list(self.unmeasured) + [f"{s.path}: {u}" for s in self.sites for u in s.unmeasured]

    @property
    def _outcome(self) -> str:
        skipped = self.not_measured()
        budget = f"{len(skipped)} not measured within the time budget (see the notes)"
        if self.changed:
            n = sum(1 for s in self.sites if s.chosen)
            line = f"optimized: {n} of {len(self.sites)} sites use a faster verified backend"
            loops = [s for s in self.sites if s.kind == "generate" and s.chosen]
            if loops:
                picks = ", ".join(f"{c.split()[-1]} {b}" for c, b in loops[0].chosen.items())
                line += f"; generate() runs the fast decode loop ({picks})"
            return line + (f"; {budget}" if skipped else "")
        if not any(self.backends.values()):
            return f"unchanged: no allowed backend runs on {self.device} for any op here"
        if skipped:
            return (
                "unchanged: no measured candidate was both within tolerance and faster than the"
                f" original; {budget}"
            )
        return "unchanged: no candidate was both within tolerance and faster than the original"

    @property
    def cost(self) -> str:
        """What optimize() itself took: seconds (the larger phases named) and peak memory."""
        mem = (
            "peak memory not measured"
            if self.peak_memory_bytes is None
            else f"peak memory +{self.peak_memory_bytes / 2**20:.1f} MiB"
        )
        big = [(k, v) for k, v in self.phases.items() if v >= 0.05 * max(self.elapsed_s, 1e-9)]
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in big)
        return (
            f"{self.tool} took {self.elapsed_s:.1f} s"
            + (f" ({parts})" if parts else "")
            + (f", {mem}")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "changed": self.changed,
            "summary": self.summary,
            "elapsed_s": self.elapsed_s,
            "phases": dict(self.phases),
            "peak_memory_bytes": self.peak_memory_bytes,
            "backends": self.backends,
            "notes": list(self.notes),
            "not_measured": self.not_measured(),
            "environment": self.environment,
            "config": self.config,
            "model_checks": [m.to_dict() for m in self.model_checks],
            "sites": [s.to_dict() for s in self.sites],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON; also written (atomically) to ``path`` when given.

        Args:
            path: file to write, or ``None``.

        Returns:
            The JSON text.
        """
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            atomic_write_text(Path(path), text + "\n")
        return text

    def rows(self) -> list[list[str]]:
        """Table rows: site, case, chosen, speed-up [CI], error, rejected (backend: reason)."""
        out = []
        for s in self.sites:
            cases = sorted({c.case for c in s.cases}, key=lambda c: (c != "prefill", c))
            for case in cases:
                best = s.best(case) if case in s.chosen else None
                shapes = ", ".join(c.shape for c in s.cases if c.case == case)
                speed = (
                    f"{best.speedup:.2f}x [{best.ci[0]:.2f}, {best.ci[1]:.2f}]"
                    if best and best.ci
                    else "-"
                )
                err = f"{best.rel_error:.1e}" if best and best.rel_error is not None else "-"
                rejected = _rejections(s, case)
                chosen = s.chosen.get(case, "original")
                if s.note.startswith("reused from "):
                    chosen += f" ({s.note.split(';')[0]})"
                out.append(
                    [
                        s.path,
                        s.kind,
                        case,
                        shapes,
                        chosen,
                        speed,
                        err,
                        rejected,
                    ]
                )
        return out

    def to_markdown(self) -> str:
        """The report as a markdown document (summary, table, whole-model check, notes)."""
        head = [
            "site",
            "kind",
            "case",
            "shapes",
            "chosen",
            "speed-up [95% CI]",
            "rel err",
            "rejected",
        ]
        lines = [
            f"# {self.tool} report: {self.model}",
            "",
            f"{self._outcome}. Device `{self.device}`, dtype `{self.dtype}`, "
            f"CPU ISA {self.environment.get('cpu_isa', 'unknown')}. {self.cost}.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in self.rows()]
        if self.model_checks:
            lines += [
                "",
                "## Whole model, original vs optimized",
                "",
                "| run | shape | rel err (tol) | speed-up [CI] | verdict |",
                "|---|---|---|---|---|",
            ]
            for m in self.model_checks:
                sp = f"{m.speedup:.2f}x [{m.ci[0]:.2f}, {m.ci[1]:.2f}]" if m.ci else "-"
                lines.append(
                    f"| {m.case} | {m.shape} | {m.rel_error:.1e} ({m.tolerance:g}) | "
                    f"{sp} | {m.verdict} |"
                )
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def __rich__(self):
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"{self.tool}: {escape(self._outcome)}", show_lines=False)
        for col in (
            "site",
            "kind",
            "case",
            "shapes",
            "chosen",
            "speed-up [CI]",
            "rel err",
            "rejected",
        ):
            table.add_column(col, overflow="fold")
        for r in self.rows():
            table.add_row(*(escape(c) for c in r))
        return table

    def print(self) -> None:
        """Print the rich table, the whole-model check and the notes to the terminal."""
        from rich.console import Console
        from rich.markup import escape

        console = Console()
        console.print(self)
        console.print(f"CPU ISA: {escape(str(self.environment.get('cpu_isa', 'unknown')))}")
        console.print(escape(self.cost))
        for m in self.model_checks:
            sp = f"{m.speedup:.2f}x [{m.ci[0]:.2f}, {m.ci[1]:.2f}]" if m.ci else "-"
            console.print(f"model {m.case} {m.shape}: rel err {m.rel_error:.1e}, {sp}: {m.verdict}")
        for n in self.notes:
            console.print(f"note: {escape(n)}")

    def __str__(self) -> str:
        return self.to_markdown()


def _rejections(site: SiteReport, case: str) -> str:
    chosen = site.chosen.get(case)
    seen: dict[str, str] = {}
    for r in site.cases:
        if r.case != case:
            continue
        for c in r.candidates:
            if c.backend == chosen or c.backend in seen or c.status == "faster":
                continue
            why = c.status
            if c.status == "error" and c.rel_error is not None:
                why += f" {c.rel_error:.1e}"
                if c.detail:
                    why += f" ({c.detail[:120]})"
            elif c.status == "slower" and c.speedup is not None:
                # "slower" covers a candidate faster by less than min_speedup: say which
                why = f"slower {c.speedup:.2f}x" if c.speedup < 1 else f"{c.speedup:.2f}x"
                if c.detail and c.speedup >= 1:
                    why = f"not fast enough: {c.detail[:120]}"
            elif c.detail:
                why += f" ({c.detail[:120]})"
            seen[c.backend] = why
    # Left: backends faster at every shape of the case (the loop above took the others) that
    # lost to the chosen one, or were not kept (``chosen`` is None: e.g. the model check).
    for r in site.cases:
        for c in r.candidates:
            if r.case == case and c.backend != chosen and c.backend not in seen:
                lo = min(
                    x.speedup or 0.0
                    for q in site.cases
                    if q.case == case
                    for x in q.candidates
                    if x.backend == c.backend
                )
                seen[c.backend] = f"faster (>= {lo:.2f}x) but " + (
                    f"{chosen} more so" if chosen else "not kept"
                )
    return "; ".join(f"{b}: {w}" for b, w in seen.items()) or "-"
