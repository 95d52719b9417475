"""Shared pieces of the benchmark suite: environment metadata, result paths, tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.cpu_info import cpu_isa

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def device_name(device: str) -> str:
    """Short folder name for results: ``cpu`` or the GPU's model (``h100``, ``h200``...)."""
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    for key in ("h200", "h100", "a100", "l4", "l40s"):
        if key in name:
            return key
    return name.replace(" ", "-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    """Versions of everything a figure depends on."""
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("numba", "triton", "onnxruntime", "onnx", "pyperf", "numpy", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = "not installed"
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except Exception:
        return "unknown"


def _command() -> str:
    """The command line as a user types it (``python -m bench.kernels ...``)."""
    argv0 = Path(sys.argv[0])
    if argv0.parent.name == "bench" and argv0.suffix == ".py":
        return " ".join(["python", "-m", f"bench.{argv0.stem}", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def environment(device: str) -> dict[str, Any]:
    """Device, versions and thread count, recorded with every result."""
    env: dict[str, Any] = {
        "device": device,
        "cpu": cpu_model(),
        # The vector ISA the CPU exposes (and torch's dispatch level): the CPU kernels' speed
        # depends on it, and machines of one cloud family differ (AVX2+FMA vs AVX-512).
        "cpu_isa": cpu_isa(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "commit": git_commit(),
        "command": _command(),
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = p.name
        env["gpu_sms"] = p.multi_processor_count
        env["cuda"] = torch.version.cuda
    return env


def where(env: dict[str, Any]) -> str:
    """The "on ..." part of a table title: the GPU, or the CPU with its vector ISA."""
    if "gpu" in env:
        return f"{env['gpu']} (host CPU ISA {env['cpu_isa']})"
    return f"{env['cpu']} ({env['cpu_isa']})"


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    return path


def speedup_interval(base, cand) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of ``median(base) / median(cand)`` over two pyperf
    benchmarks' values (or plain lists of seconds); ``None`` with fewer than two values a
    side. In brackets after a speed-up, it shows whether the samples can tell it from 1."""
    from ryzen_opt.timing import bootstrap_ratio_ci

    if base is None or cand is None:
        return None
    b = list(base.get_values() if hasattr(base, "get_values") else base)
    c = list(cand.get_values() if hasattr(cand, "get_values") else cand)
    if len(b) < 2 or len(c) < 2:
        return None
    return bootstrap_ratio_ci(b, c)


def with_interval(ratio: float, iv: tuple[float, float] | None) -> str:
    """``"1.25x [1.21, 1.29]"`` (no brackets without an interval)."""
    return f"{ratio:.2f}x" + ("" if iv is None else f" [{iv[0]:.2f}, {iv[1]:.2f}]")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[str(c) for c in r])
    Console(width=max(120, len(headers) * 14)).print(table)


def installed_route(model) -> str:
    """The fast-path routes an ``optimize()``d seed model holds *now* (after its whole-model
    check, which may drop routes or revert every swap), or ``"unchanged (why)"``."""
    paths = model.__dict__.get("_fast_paths")
    if paths is not None:
        return "; ".join(paths.describe())
    report = getattr(model, "optimization_report", None)
    reverted = [n for n in report.notes if n.startswith("reverted")] if report else []
    return "unchanged" + (f" ({reverted[-1]})" if reverted else "")


def cuda_graphed(fn, calls: int = 1):
    """``calls`` calls of ``fn`` captured in one CUDA graph (after three warm-up calls on a
    side stream); returns the graph's replay.

    A replay has no Python, custom-op dispatch or kernel-launch time in it: what a timing of it
    measures is GPU time, as under torch.compile's ``mode="reduce-overhead"``, a graph-captured
    decode loop, or a training step whose GPU work hides the host's launches.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay
