"""The benchmarks' one-process mode: every column timed in one process, written as pyperf JSON.

pyperf's worker mode (``Runner.bench_time_func``) runs one worker process per benchmark and
per repetition; each pays the imports, JIT compilation, autotuning or ``torch.compile`` again.
On an H200 ``bench.model`` in that mode did not finish within 320 s. In this mode the
columns of one row (a baseline and its candidates) are timed in the same process by
:func:`ryzen_opt.timing.time_interleaved` (CUDA events on GPU), on identical inputs, after
warm-up, one sample of each per round; the samples are then stored as pyperf ``Run``/
``Benchmark`` objects in a ``BenchmarkSuite`` file, which ``python -m pyperf show`` and
``compare_to`` read like a worker-mode file.

Used by default with ``--quick`` and on CUDA; ``--mode workers`` asks for pyperf workers,
``--mode inprocess`` for this mode anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.timing import Timing

MODES = ("inprocess", "workers")
# Samples per column in this mode: quick keeps 5 (enough for a median and an IQR), the full
# run 15 rounds (one round = one sample of every column, so each column gets 15).
QUICK_REPEAT = 5
FULL_REPEAT = 15
_START = time.perf_counter()


def default_mode(device: str, quick: bool) -> str:
    """``inprocess`` for ``--quick`` and on CUDA, else pyperf's ``workers``."""
    return "inprocess" if quick or device == "cuda" else "workers"


def add_mode_args(ap: argparse.ArgumentParser) -> None:
    """The options shared by ``bench.kernels`` and ``bench.model`` for picking the mode."""
    ap.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="inprocess: every column in this process (default with --quick and on cuda); "
        "workers: pyperf worker processes (default otherwise)",
    )


def parse_args(ap: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse this mode's options; anything else (pyperf's ``-p``/``-n``...) exits 2 saying why."""
    args, rest = ap.parse_known_args(argv)
    if rest:
        ap.error(
            f"unrecognized arguments for --mode inprocess: {' '.join(rest)} (pyperf options such "
            "as -p/-n/--warmups apply to --mode workers; values per cell here: --repeat N)"
        )
    return args


def positive_int(text: str) -> int:
    """argparse type: an int >= 3 (fewer samples give no spread)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 3, got {text!r}") from None
    if n < 3:
        raise argparse.ArgumentTypeError(f"expected an integer >= 3, got {n}")
    return n


def pyperf_benchmark(name: str, timing: Timing, metadata: Mapping[str, Any]):
    """A ``pyperf.Benchmark`` holding ``timing``'s samples (seconds per call) as one run."""
    import pyperf

    meta = {
        "name": name,
        "unit": "second",
        "loops": int(timing.inner),
        "mode": "inprocess",
        **{k: v for k, v in metadata.items() if isinstance(v, (str, int, float))},
    }
    # pyperf refuses values <= 0; a CUDA-event sample of an empty call can read 0.0.
    values = [max(float(v), 1e-12) for v in timing.samples]
    return pyperf.Benchmark([pyperf.Run(values, metadata=meta, collect_metadata=False)])


def write_suite(path: Path, benchmarks: list) -> Path:
    """Write ``benchmarks`` as one pyperf suite file (atomic rename), and return the path."""
    import pyperf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pyperf.BenchmarkSuite(benchmarks).dump(str(tmp), compact=False, replace=True)
    os.replace(tmp, path)
    return path


def sync(device: str) -> None:
    """Wait for queued GPU work (first-call times must include it)."""
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()


def progress(tool: str, message: str) -> None:
    """One progress line on stderr with the seconds since start (the GPU log keeps them)."""
    print(f"[{tool} {time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)
