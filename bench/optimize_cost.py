"""What ``optimize()`` itself costs on a Hugging Face decoder: seconds per phase, peak memory.

    python -m bench.optimize_cost [--model qwen2-0.5b|gpt2|llama-1b|tiny] [--layers N]
                                  [--example none|BxT] [--device cpu|cuda]
                                  [--time-budget S] [--cache] [-o out.json]

Builds the model as ``bench.hf_decode`` does (its model table, random weights from seed 0;
``--layers`` overrides the layer count to iterate faster), then runs
``optimize(model, example_inputs=...)`` once with ``OptimizeConfig(use_cache=False)``
(``--cache``: the default cache) and prints:

* the report's ``elapsed_s`` and ``peak_memory_bytes`` (optimize()'s own peak above the
  resident model), against the model's weight bytes;
* the time per phase, timed around the optimizer's functions from outside (plan: site
  discovery and input capture; decoder paths: the ``generate`` loop selection; one line per
  site kind with the number of sites measured; fast paths; the whole-model check; the rest:
  the copy of the model, installing, the report);
* the process's peak RSS (``ru_maxrss``) and its RSS before ``optimize()``.

One optimize() per process, so that peaks do not mix: run it twice for the synthetic shapes
and an example prompt. ``--example 1x32`` is a batch-1 prompt of 32 random ids (seed 1).
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.hf_decode import MODELS, build_model, weight_bytes


def build(name: str, layers: int | None, device: str) -> torch.nn.Module:
    """``bench.hf_decode.build_model``'s model (float32), with ``layers`` decoder layers if
    given."""
    over = {}
    if layers is not None:
        over["n_layer" if MODELS[name][0] == "gpt2" else "num_hidden_layers"] = layers
    return build_model(name, device, torch.float32, **over)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RssTrace:
    """A thread sampling the RSS every ``interval_s``: ``(time, bytes)`` pairs."""

    def __init__(self, interval_s: float = 0.05) -> None:
        import threading

        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, dt: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), _rss()))
            self._stop.wait(dt)

    def __enter__(self) -> RssTrace:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def peak(self, t0: float, t1: float) -> int:
        return max((b for t, b in self.samples if t0 <= t <= t1), default=0)


def instrument() -> tuple[dict[str, float], dict[str, int]]:
    """Wrap the optimizer's phases with timers; ``(seconds, calls)`` per phase; the
    ``(name, start, end)`` spans are in ``instrument.spans``."""
    from ryzen_opt import optimizer
    from ryzen_opt.optimization import engine

    secs: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    spans = instrument.spans = []

    def wrap(owner, attr, name_of):
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, **k):
            name = name_of(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                t1 = time.perf_counter()
                secs[name] += t1 - t0
                calls[name] += 1
                spans.append((name, t0, t1))

        setattr(owner, attr, timed)

    wrap(optimizer.KernelOptimizer, "plan", lambda *a, **k: "plan (find sites, capture inputs)")
    wrap(optimizer.KernelOptimizer, "_decoder_paths", lambda *a, **k: "decoder paths (generate)")
    wrap(engine.Engine, "measure_site", lambda self, site, *a, **k: f"sites: {site.kind}")
    wrap(engine.Engine, "fast_paths", lambda *a, **k: "model-level fast paths")
    wrap(optimizer, "check_whole_model", lambda *a, **k: "whole-model check")
    return secs, calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2-0.5b", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--example", default="none", help="none, or BxT random prompt ids")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--time-budget", type=float, default=None, help="default: the config's; 0: no bound"
    )
    ap.add_argument("--cache", action="store_true", help="use the decision cache")
    ap.add_argument("--repeat", type=int, default=None, help="OptimizeConfig.repeat (default: its)")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)

    from ryzen_opt import OptimizeConfig, optimize

    model = build(args.model, args.layers, args.device)
    wbytes = weight_bytes(model)
    example = None
    if args.example != "none":
        b, t = (int(x) for x in args.example.lower().split("x"))
        g = torch.Generator().manual_seed(1)
        vocab = model.config.vocab_size
        example = torch.randint(0, vocab, (b, t), generator=g).to(args.device)
    kw = {"use_cache": args.cache, "progress": False}
    if args.time_budget is not None:
        kw["time_budget_s"] = args.time_budget or None
    if args.repeat is not None:
        kw["repeat"] = args.repeat
    cfg = OptimizeConfig(**kw)
    secs, calls = instrument()
    rss0 = _rss()
    t0 = time.perf_counter()
    with RssTrace() as trace:
        out = optimize(model, example_inputs=example, config=cfg)
    wall = time.perf_counter() - t0
    t_end = time.perf_counter()
    rep = out.optimization_report
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    other = wall - sum(secs.values())
    mib = 2**20
    lines = [
        f"model {args.model} layers={args.layers or 'all'} example={args.example} "
        f"device={args.device} threads={torch.get_num_threads()} use_cache={args.cache}",
        f"weights {wbytes / mib:.0f} MiB; optimize() {rep.elapsed_s:.1f} s (report), "
        f"{wall:.1f} s (wall); peak +{(rep.peak_memory_bytes or 0) / mib:.0f} MiB "
        f"(report) = {(rep.peak_memory_bytes or 0) / wbytes:.2f}x weights; "
        f"process RSS before {rss0 / mib:.0f} MiB, peak {peak / mib:.0f} MiB",
        f"summary: {rep.summary}",
    ]
    peaks: dict[str, int] = defaultdict(int)
    for name, a, b in instrument.spans:
        peaks[name] = max(peaks[name], trace.peak(a, b))
    for name, s in sorted(secs.items(), key=lambda kv: -kv[1]):
        lines.append(
            f"  {s:8.1f} s  {name} ({calls[name]} call{'s' * (calls[name] != 1)}); "
            f"RSS peak +{(peaks[name] - rss0) / mib:.0f} MiB"
        )
    lines.append(f"  {other:8.1f} s  rest (copy, install, report)")
    spans = sorted(instrument.spans, key=lambda x: x[1])
    first = spans[0][1] if spans else t_end
    lines.append(
        f"  before the first phase (copy): RSS peak +{(trace.peak(t0, first) - rss0) / mib:.0f} MiB"
        f"; at the end +{(_rss() - rss0) / mib:.0f} MiB (the optimized model held)"
    )
    phases = getattr(rep, "phases", None)
    if phases:
        lines.append("report phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    reused = sum(1 for s in rep.sites if "reused from" in (s.note or ""))
    lines.append(f"sites in report: {len(rep.sites)} ({reused} reused decisions)")
    for s in rep.sites:
        if s.chosen:
            lines.append(f"  chose {s.path} {s.kind}: {s.chosen}")
    for m in rep.model_checks:
        sp = f"{m.speedup:.2f}x" if m.speedup else "-"
        lines.append(f"  model check {m.case} {m.shape}: {m.verdict} {sp}")
    for n in rep.notes:
        lines.append(f"  note: {n[:200]}")
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "weight_bytes": wbytes,
                    "elapsed_s": rep.elapsed_s,
                    "wall_s": wall,
                    "peak_memory_bytes": rep.peak_memory_bytes,
                    "process_peak_rss": peak,
                    "rss_before": rss0,
                    "phases_s": dict(secs),
                    "phase_calls": dict(calls),
                    "spans": [(n, a - t0, b - t0) for n, a, b in instrument.spans],
                    "rss_trace": [(t - t0, b - rss0) for t, b in trace.samples[::10]],
                    "report": rep.to_dict(),
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
