"""Verdicts of ``SemanticCompressor``: one ``ArtifactResult`` per artifact, the report
(JSON, rich table, PNG plot) and the choice of the best artifact within an accuracy budget."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class ArtifactResult:
    """One artifact's verdict, side by side with fp32."""

    method: str
    path: str | None  # None once a temporary workdir is deleted
    size_bytes: int
    size_ratio: float
    zipped_bytes: int
    accuracy: float
    accuracy_drop: float  # points: 100 * (fp32 accuracy - accuracy)
    latency: dict[str, dict[str, Any]]  # "prefill@b" / "decode@b" -> timings + speedup
    build_seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def speedup(self, phase: str, batch: int) -> float:
        return float(self.latency[f"{phase}@{batch}"]["speedup"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CompressionReport:
    """All verdicts of a run, the fp32 reference and the chosen artifact."""

    results: list[ArtifactResult]
    baseline: ArtifactResult
    chosen: str | None
    max_accuracy_drop: float | None
    prefer: str
    config: dict[str, Any]
    environment: dict[str, Any]
    pytorch_accuracy: float
    # The fp32-vs-fp32 (A/A) row's speed-ups: when one is off 1 by more than the tolerance,
    # every speed figure of the run is noise and the choice ignores speed.
    speed_trusted: bool = True
    aa_range: tuple[float, float] | None = None
    aa_tolerance: float = 0.05

    def result(self, method: str) -> ArtifactResult:
        """The verdict of ``method``."""
        for r in self.results:
            if r.method == method:
                return r
        raise KeyError(f"method {method!r} is not in this report")

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": [r.to_dict() for r in self.results],
            "chosen": self.chosen,
            "max_accuracy_drop": self.max_accuracy_drop,
            "prefer": self.prefer,
            "config": self.config,
            "environment": self.environment,
            "pytorch_accuracy": self.pytorch_accuracy,
            "speed_trusted": self.speed_trusted,
            "aa_range": list(self.aa_range) if self.aa_range is not None else None,
            "aa_tolerance": self.aa_tolerance,
        }

    def speed_note(self) -> str:
        """One line on whether the speed figures can be read (the A/A row's verdict)."""
        if self.aa_range is None:
            return "speed: no fp32-vs-fp32 check in this report"
        lo, hi = self.aa_range
        tol = 100 * self.aa_tolerance
        if self.speed_trusted:
            return (
                f"speed: fp32 vs itself (before and after the others) read "
                f"{lo:.3f}-{hi:.3f}x, within "
                f"+/-{tol:.0f}% (this run's noise floor)"
            )
        return (
            f"speed figures are NOISE: fp32 vs itself (before and after the others) read "
            f"{lo:.3f}-{hi:.3f}x, outside +/-{tol:.0f}% (other work on the machine?); "
            f"choices use size and accuracy only"
        )

    def to_json(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2))
        return p

    def table(self):
        """A rich ``Table`` with one row per artifact and fp32 first."""
        from rich.table import Table

        bs = self.config["batch_sizes"]
        t = Table(
            title="SemanticCompressor: artifacts vs fp32 ONNX (same runtime and inputs)",
            caption=self.speed_note(),
        )
        for col in ("method", "MB", "x size", "zip MB", "acc %", "drop pt"):
            t.add_column(col, justify="right" if col != "method" else "left")
        for b in bs:
            t.add_column(f"prefill@{b}", justify="right")
            t.add_column(f"decode@{b}", justify="right")
        for r in self.results:
            row = [
                r.method + (" *" if r.method == self.chosen else ""),
                f"{r.size_bytes / 1e6:.2f}",
                f"{r.size_ratio:.3f}",
                f"{r.zipped_bytes / 1e6:.2f}",
                f"{100 * r.accuracy:.1f}",
                f"{r.accuracy_drop:+.1f}",
            ]
            for b in bs:
                for ph in ("prefill", "decode"):
                    lat = r.latency[f"{ph}@{b}"]
                    row.append(f"{lat['median_s'] * 1e6:.0f}us {lat['speedup']:.2f}x")
            t.add_row(*row)
        return t

    def plot(self, path: str | os.PathLike) -> Path:
        """Size ratio vs decode speed-up (largest batch), labelled with accuracy, as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        b = max(self.config["batch_sizes"])
        b1 = min(self.config["batch_sizes"])
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, batch in zip(axes, (b1, b), strict=True):
            for r in self.results:
                x, y = r.size_ratio, r.speedup("decode", batch)
                ax.scatter([x], [y], s=60)
                ax.annotate(
                    f"{r.method}\n{100 * r.accuracy:.1f}%",
                    (x, y),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xlabel("file size / fp32")
            ax.set_ylabel(f"decode speed-up vs fp32 ONNX (batch {batch})")
            ax.set_title(f"decode, batch {batch} (label: test exact match)")
        fig.tight_layout()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=100)
        plt.close(fig)
        return p


def environment(threads: int | None) -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    import onnx
    import onnxruntime

    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "ort_threads": threads,
        # Other work on the machine skews latency: the 1/5/15-minute load at report time.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def aa_verdict(speedups: Sequence[float], tolerance: float) -> tuple[bool, tuple[float, float]]:
    """``(trusted, (lowest, highest))`` of fp32-vs-fp32 speed-ups.

    Both sides of such a comparison run the same file on the same inputs, so every speed-up
    should read 1; one off by more than ``tolerance`` (0.05: 5%) shows the run's timing noise.
    """
    ups = [float(v) for v in speedups]
    lo, hi = min(ups), max(ups)
    return bool(lo >= 1 - tolerance and hi <= 1 + tolerance), (lo, hi)


def select(
    results: Sequence[ArtifactResult],
    max_accuracy_drop: float,
    prefer: str,
    batch: int,
    use_speed: bool = True,
) -> str:
    """Name of the best artifact whose accuracy drop is within ``max_accuracy_drop`` points.

    Args:
        results: verdicts with ``accuracy_drop`` filled (fp32 among them, drop 0).
        max_accuracy_drop: the budget in points.
        prefer: ``"size"`` or ``"speed"`` (decode speed-up at ``batch``).
        batch: the batch size whose decode speed-up ranks speed.
        use_speed: ``False`` when the speed figures are noise: rank by size, then accuracy,
            whatever ``prefer`` says.

    Returns:
        The chosen method's name.
    """
    ok = [r for r in results if r.accuracy_drop <= max_accuracy_drop + 1e-9]
    if not ok:
        raise ValueError("no artifact is within max_accuracy_drop (fp32 must be in results)")
    if not use_speed:
        key = lambda r: (r.size_bytes, r.accuracy_drop)
    elif prefer == "size":
        key = lambda r: (r.size_bytes, -r.speedup("decode", batch))
    else:
        key = lambda r: (-r.speedup("decode", batch), r.size_bytes)
    return min(ok, key=key).method
