"""In-process timing shared by ``optimize()`` and ``bench/``.

* :func:`time_fn` times one callable: warm-up calls first (JIT compilation, autotuning, the
  allocator), then ``repeat`` samples of ``inner`` calls each; on CUDA each sample is bounded
  by CUDA events (``synchronize`` before reading them). Returns median, interquartile range
  and the samples.
* :func:`compare` times a baseline and a candidate on the same inputs, interleaving their
  samples (ABBA order) so drift in clocks or load hits both alike, and returns the speed-up
  ``baseline/candidate`` with a bootstrap confidence interval on the ratio of medians.
* :func:`time_interleaved` times several callables doing the same work (a baseline and its
  candidates), one sample of each per round in a balanced order, and returns a
  :class:`Timing` per callable (the benchmarks' one-process mode).
* :func:`peak_memory` runs a callable once and reports its peak memory: CUDA max allocated
  bytes above the starting allocation, or on CPU the growth of the process's peak RSS.

All times are seconds per call.
"""

from __future__ import annotations

import gc
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median, interquartile range, and the raw samples."""

    median: float
    iqr: float
    q1: float
    q3: float
    n: int
    inner: int
    samples: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples"] = list(self.samples)
        return d

    def __str__(self) -> str:
        return f"{format_seconds(self.median)} ± {format_seconds(self.iqr / 2)} (n={self.n})"


@dataclass(frozen=True)
class Comparison:
    """Baseline vs candidate on identical inputs. ``speedup > 1`` means the candidate is faster."""

    baseline: Timing
    candidate: Timing
    speedup: float
    ci_low: float
    ci_high: float
    confidence: float

    @property
    def faster(self) -> bool:
        """Candidate faster beyond the noise: the whole confidence interval is above 1."""
        return self.ci_low > 1.0

    @property
    def slower(self) -> bool:
        return self.ci_high < 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline.to_dict(),
            "candidate": self.candidate.to_dict(),
            "speedup": self.speedup,
            "ci": [self.ci_low, self.ci_high],
            "confidence": self.confidence,
        }


def format_seconds(s: float) -> str:
    """Human units: ``1.23 ms``."""
    if not math.isfinite(s):
        return str(s)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _device_of(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    return torch.device(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_sample(fn: Callable[[], Any], inner: int, device: torch.device) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _summarize(samples: list[float], inner: int) -> Timing:
    arr = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return Timing(
        float(med), float(q3 - q1), float(q1), float(q3), len(samples), inner, tuple(samples)
    )


def _calibrate_inner(fn: Callable[[], Any], device: torch.device, min_sample_s: float) -> int:
    inner = 1
    while True:
        t = _one_sample(fn, inner, device)
        if t * inner >= min_sample_s or inner >= 1 << 20:
            return inner
        inner = max(inner * 2, int(math.ceil(min_sample_s / max(t, 1e-9))))


def _check_args(repeat: int, warmup: int) -> None:
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 3:
        raise ValueError(f"repeat must be an int >= 3, got {repeat!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")


def time_fn(
    fn: Callable[[], Any],
    *,
    repeat: int = 20,
    warmup: int = 3,
    device: str | torch.device | None = None,
    min_sample_s: float = 2e-3,
    inner: int | None = None,
) -> Timing:
    """Time ``fn()`` (no arguments: bind inputs with a closure so every call sees the same).

    Args:
        fn: the work to time.
        repeat: samples to take (>= 3).
        warmup: untimed calls first (compilation, autotuning, allocator).
        device: where the work runs; ``cuda`` uses CUDA events.
        min_sample_s: each sample runs ``fn`` enough times to last at least this long, so
            timer resolution and launch jitter stay small against it.
        inner: force the calls per sample (skips calibration).

    Returns:
        :class:`Timing` in seconds per call.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _check_args(repeat, warmup)
    dev = _device_of(device)
    for _ in range(warmup):
        fn()
    _sync(dev)
    inner = inner or _calibrate_inner(fn, dev, min_sample_s)
    samples = [_one_sample(fn, inner, dev) for _ in range(repeat)]
    return _summarize(samples, inner)


def bootstrap_ratio_ci(
    base: list[float] | tuple[float, ...],
    cand: list[float] | tuple[float, ...],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``median(base) / median(cand)``."""
    rng = np.random.default_rng(seed)
    b = np.asarray(base, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    bi = rng.integers(0, len(b), (resamples, len(b)))
    ci = rng.integers(0, len(c), (resamples, len(c)))
    ratios = np.median(b[bi], axis=1) / np.median(c[ci], axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha])
    return float(lo), float(hi)


def compare(
    baseline: Callable[[], Any],
    candidate: Callable[[], Any],
    *,
    repeat: int = 20,
    warmup: int = 3,
    device: str | torch.device | None = None,
    min_sample_s: float = 2e-3,
    confidence: float = 0.95,
    inner: int | None = None,
) -> Comparison:
    """Time ``baseline`` and ``candidate`` interleaved (ABBA) and return the speed-up.

    Both callables must do the same work on the same inputs; the caller binds them.
    ``inner``: calls per sample for both, without the calibration calls (for a caller that
    has just timed warm calls of both at ``min_sample_s`` or more: ``inner=1``).
    """
    if not callable(baseline) or not callable(candidate):
        raise TypeError("baseline and candidate must be callables")
    _check_args(repeat, warmup)
    if inner is not None and (isinstance(inner, bool) or not isinstance(inner, int) or inner < 1):
        raise ValueError(f"inner must be an int >= 1 or None, got {inner!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    dev = _device_of(device)
    for _ in range(warmup):
        baseline()
        candidate()
    _sync(dev)
    # Each side's calls per sample, so that a sample lasts at least min_sample_s.
    inner_b = inner or _calibrate_inner(baseline, dev, min_sample_s)
    inner_c = inner or _calibrate_inner(candidate, dev, min_sample_s)
    bs: list[float] = []
    cs: list[float] = []
    for i in range(repeat):
        order = ((baseline, inner_b, bs), (candidate, inner_c, cs))
        for fn, k, out in order if i % 2 == 0 else order[::-1]:
            out.append(_one_sample(fn, k, dev))
    tb, tc = _summarize(bs, inner_b), _summarize(cs, inner_c)
    lo, hi = bootstrap_ratio_ci(bs, cs, confidence)
    return Comparison(tb, tc, tb.median / tc.median, lo, hi, confidence)


def _balanced_orders(k: int) -> list[list[int]]:
    """Orders of ``k`` items in which each item comes first equally often and follows every
    other item equally often (a Williams design: ``k`` rounds for even ``k``, ``2k`` for odd):
    what one column leaves behind (warm caches, busy threads) reaches every column alike."""
    first, lo, hi = [0], 1, k - 1
    while lo <= hi:
        first.append(lo)
        lo += 1
        if lo <= hi:
            first.append(hi)
            hi -= 1
    rows = [[(x + i) % k for x in first] for i in range(k)]
    return rows if k % 2 == 0 else rows + [r[::-1] for r in rows]


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeat: int = 20,
    warmup: int = 3,
    device: str | torch.device | None = None,
    min_sample_s: float = 2e-3,
    settle_s: float = 0.0,
) -> dict[str, Timing]:
    """Time several callables that do the same work on the same inputs, interleaved.

    Every callable gets ``warmup`` untimed calls first, then its own calls-per-sample count;
    each of the ``repeat`` rounds takes one sample of every callable. The order changes each
    round so that every callable leads equally often and follows every other one equally
    often (two callables: AB BA AB BA; four: 0132 1203 2310 3021), so a drift in clocks or
    load, and whatever one callable leaves behind, reach every column alike.

    Args:
        fns: name -> callable without arguments (bind inputs with a closure).
        repeat: rounds, i.e. samples per callable (>= 3).
        warmup: untimed calls per callable before timing.
        device: where the work runs; ``cuda`` uses CUDA events.
        min_sample_s: each sample runs its callable enough times to last at least this long.
        settle_s: untimed pause after every sample, so thread pools that busy-wait after
            their work (ONNX Runtime's intra-op threads) are idle before the next column
            starts: measured on 2 cores, a 16x128 eager prefill took 53 ms right after an
            ONNX Runtime decode instead of 26 ms, and 30 ms after a 50 ms pause.

    Returns:
        name -> :class:`Timing` in seconds per call, in the order of ``fns``.
    """
    if not isinstance(fns, Mapping) or not fns:
        raise ValueError(f"fns must be a non-empty mapping of name -> callable, got {fns!r}")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"fns[{name!r}] must be callable, got {type(fn).__name__}")
    _check_args(repeat, warmup)
    if isinstance(settle_s, bool) or not isinstance(settle_s, (int, float)) or not settle_s >= 0:
        raise ValueError(f"settle_s must be a number >= 0, got {settle_s!r}")
    dev = _device_of(device)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    _sync(dev)
    inner = {n: _calibrate_inner(fns[n], dev, min_sample_s) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    orders = _balanced_orders(len(names))
    for i in range(repeat):
        for j in orders[i % len(orders)]:
            n = names[j]
            samples[n].append(_one_sample(fns[n], inner[n], dev))
            if settle_s:
                time.sleep(settle_s)
    return {n: _summarize(samples[n], inner[n]) for n in names}


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class _RssSampler:
    """Samples the process's resident set size in a thread while work runs."""

    def __init__(self, interval_s: float = 5e-4) -> None:
        import threading

        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.start_rss = self._proc.memory_info().rss
        self.peak_rss = self.start_rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)


class PeakMemory:
    """Context manager: peak memory of the work inside it, in bytes, as ``.peak_bytes``.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry (the device's
    peak statistics are reset at entry). CPU: the peak resident set size above the RSS at
    entry, the larger of a sampling thread's reading (every ``interval_s``) and the growth of
    the kernel's peak-RSS counter (which catches short spikes but only once they exceed
    every earlier peak).

    Args:
        device: where the work runs.
        interval_s: the CPU sampling period; keep it long where the work inside is being
            timed (a 20 ms period costs well under 0.1% of a core).
    """

    def __init__(self, device: str | torch.device | None = None, interval_s: float = 5e-4):
        self.device = _device_of(device)
        self.interval_s = interval_s
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            self._before_max = _peak_rss_bytes()
            self._sampler = _RssSampler(self.interval_s).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._before)
            return
        s = self._sampler
        s.__exit__(*exc)
        counter = _peak_rss_bytes() - max(self._before_max, s.start_rss)
        self.peak_bytes = max(0, s.peak_rss - s.start_rss, counter)


def peak_memory(fn: Callable[[], Any], device: str | torch.device | None = None) -> int:
    """Peak memory of one call of ``fn``, in bytes (see :class:`PeakMemory`)."""
    with PeakMemory(device) as mem:
        fn()
    return mem.peak_bytes


def median(xs: list[float]) -> float:
    return statistics.median(xs)
