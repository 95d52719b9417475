"""End-to-end model benchmark: the baseline ``SimpleTransformerModel`` and its variants.

    python -m bench.model [--device cpu|cuda] [--quick] [--variants baseline,...]
                          [--mode inprocess|workers] [--repeat N] [-o out.json]

Workloads, on the default configuration (vocab 2048, width 256, 4 heads, 2 layers, MLP 512,
context 128), random weights from seed 0 and random token ids from seed 1, identical for
every variant:

* ``ttft``: time to first token of a 16 x 128 batch prefill (one forward over the prompt and
  the greedy pick of the next token).
* ``decode b1`` / ``decode b16``: greedy KV-cache generation that fills the whole 128-token
  context: a 1-token prompt and 127 new tokens per row (the default context of 128 leaves
  no room for 128 new tokens after a prompt); tokens/s = batch x 127 / time.
* peak memory of each workload (CUDA: max allocated above the start; CPU: peak RSS growth),
  measured after a warm-up call of the same workload.

Every variant is a column next to the baseline, with the same threads; each variant's logits
are compared with the baseline's (max abs difference). Two modes (``bench/inprocess.py``):

* ``inprocess`` (default with ``--quick`` and on CUDA): every variant is built once in this
  process and the columns of each workload are timed by ``ryzen_opt.timing.time_interleaved``
  (one sample of every column per round, in a balanced order; CUDA events on GPU) after warm-up,
  ``--repeat`` samples each (5 with ``--quick``, else 15); pyperf JSON is written from the
  samples. Peak memory: CUDA in this process (allocated bytes, unaffected by earlier work);
  CPU in one fresh process per variant, two at a time, its workloads in order b1, b16, ttft
  (RSS growth needs a process whose allocator has not yet held the larger workloads).
* ``workers``: pyperf ``bench_time_func``, one worker process per cell and repetition, and
  peak memory in one fresh process per cell (the committed CPU results).

``--quick`` runs every variant with fewer samples, and ``optimize()`` with
``QUICK_OPTIMIZE`` (fewer timing samples per decision); the table says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench import inprocess
from bench.common import (
    RESULTS,
    device_name,
    environment,
    markdown_table,
    print_table,
    speedup_interval,
    where,
    with_interval,
    write_json,
)
from bench.model_variants import QUICK_OPTIMIZE, VARIANTS, Variant, settings
from ryzen_opt.models import ModelConfig, SimpleTransformerModel

PREFILL = (16, 128)
DECODE_BATCHES = (1, 16)
NEW_TOKENS = 127
# The figures an earlier report gave for this model shape (other machine, other settings):
# shown for context only, never as a ratio.
REFERENCE_REPORT = {"ttft_ms": 4.18, "decode_tok_s": 564.0, "peak_mb": 262.69}
WORKLOADS = ("ttft", *[f"decode b{b}" for b in DECODE_BATCHES])
# Pause after each in-process sample: ONNX Runtime's intra-op threads keep spinning after a
# run; measured on 2 cores, the baseline's prefill right after an ONNX Runtime decode took
# 53 ms instead of 26 ms, 30 ms after a 50 ms pause. GPU samples are CUDA-event bounded and
# the ONNX Runtime column is CPU-only, so no pause there.
SETTLE_S = {"cpu": 0.05, "cuda": 0.0}


def make_model(device: str) -> SimpleTransformerModel:
    torch.manual_seed(0)
    return SimpleTransformerModel(ModelConfig()).to(device).eval()


def make_inputs(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "prefill": torch.randint(0, 2048, PREFILL, generator=g).to(device),
        **{
            f"decode b{b}": torch.randint(0, 2048, (b, 1), generator=g).to(device)
            for b in DECODE_BATCHES
        },
    }


def workloads(runner_obj, inputs: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    """The timed calls of one variant, keyed by workload name."""

    def ttft():
        with torch.no_grad():
            logits, _ = runner_obj(inputs["prefill"])
            return logits[:, -1].argmax(-1)

    out = {"ttft": ttft}
    for b in DECODE_BATCHES:
        x = inputs[f"decode b{b}"]
        out[f"decode b{b}"] = lambda x=x: runner_obj.generate(x, NEW_TOKENS)
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_func(variant: Variant, workload: str, device: str):
    state: dict[str, Any] = {}

    def time_func(loops: int) -> float:
        if "fn" not in state:
            obj = variant.build(make_model(device), device)
            state["fn"] = workloads(obj, make_inputs(device))[workload]
            state["fn"]()  # compile/capture outside the timed loops
        fn = state["fn"]
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        _sync(device)
        return time.perf_counter() - t0

    return time_func


def _peak_memory_child(variant: str, workload: str, device: str) -> None:
    """Print the peak bytes of ``workload`` (or of every workload, ``all``) as JSON."""
    from ryzen_opt.timing import peak_memory

    model = make_model(device)
    obj = VARIANTS[variant].build(model, device)
    fns = workloads(obj, make_inputs(device))
    # ``all``: smallest first, so a workload's growth is not hidden by memory the allocator
    # kept from a larger one.
    names = [f"decode b{b}" for b in DECODE_BATCHES] + ["ttft"] if workload == "all" else [workload]
    out = {}
    for w in names:
        fns[w]()  # warm-up: JIT and allocator caches are not the workload's peak
        out[w] = peak_memory(fns[w], device)
    print(json.dumps({"peak_bytes": out}))


def peak_memory_fresh(variant: str, workload: str, device: str) -> int | dict | None:
    """Peak memory of one workload call (or of each, ``workload="all"``) in a fresh process."""
    cmd = [sys.executable, "-m", "bench.model", "--peak-memory-child", variant, workload]
    cmd += ["--device", device] + (["--quick"] if settings["quick"] else [])
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parent.parent
    )
    try:
        peaks = json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]
        return {w: int(v) for w, v in peaks.items()} if workload == "all" else int(peaks[workload])
    except (IndexError, ValueError, KeyError, TypeError, AttributeError):
        print(f"peak memory of {variant}/{workload} failed: {res.stderr[-500:]}", file=sys.stderr)
        return None


def _peak_memory_all(results: dict, variants: list[Variant], device: str) -> None:
    """Peak memory of every (variant, workload), each in a fresh process.

    On CUDA the children run a few at a time (each reads its own ``max_memory_allocated``,
    so they do not disturb each other's figure; a GPU host has the cores): one at a time they
    took longer than a device call may run. On the CPU they stay one at a time, since RSS
    growth is measured there and the machine has 2 cores.
    """
    jobs = [(v.name, w) for v in variants if results[v.name]["reason"] is None for w in WORKLOADS]
    workers = max(1, min(len(jobs), (os.cpu_count() or 1) // 4)) if device == "cuda" else 1
    with ThreadPoolExecutor(workers) as pool:
        peaks = list(pool.map(lambda j: peak_memory_fresh(j[0], j[1], device), jobs))
    for (name, w), peak in zip(jobs, peaks, strict=True):
        results[name].setdefault("peak", {})[w] = peak


def _peak_memory_per_variant(results: dict, names: list[str], device: str) -> None:
    """Peak memory of each variant's workloads, one fresh process per variant, two at a time.

    RSS is per process, so two children do not change each other's figure; 4 children
    instead of 12 keep the quick run's peak-memory column at about 30 s on 2 cores.
    """

    def one(name: str):
        t0 = time.perf_counter()
        got = peak_memory_fresh(name, "all", device)
        inprocess.progress(
            "bench.model", f"peak memory of {name}: {time.perf_counter() - t0:.1f} s"
        )
        return got

    with ThreadPoolExecutor(2) as pool:
        peaks = list(pool.map(one, names))
    for name, got in zip(names, peaks, strict=True):
        results[name]["peak"] = {w: (got or {}).get(w) for w in WORKLOADS}


def _logit_diff(built, device: str) -> tuple[float, dict[str, str]]:
    inputs = make_inputs(device)
    with torch.no_grad():
        ref, _ = make_model(device)(inputs["prefill"])
        out, _ = built(inputs["prefill"])
    report = getattr(built, "optimization_report", None)
    chosen = {}
    if report is not None:
        chosen = {f"{s.path} {case}": b for s in report.sites for case, b in s.chosen.items()}
    return float((out.float() - ref.float()).abs().max()), chosen


def max_logit_diff(variant: Variant, device: str) -> tuple[float, dict[str, str]]:
    """Largest |logit| difference to the baseline on the prefill input, and what the variant
    chose per site and case when it carries an ``optimization_report`` (``optimize()``)."""
    return _logit_diff(variant.build(make_model(device), device), device)


def run_inprocess(names: list[str], device: str, repeat: int, output: Path) -> dict:
    """Every variant built once here, each workload's columns timed interleaved, pyperf JSON
    written to ``output``. Returns the results ``_report`` reads."""
    from ryzen_opt.timing import peak_memory, time_interleaved

    inputs = make_inputs(device)
    results: dict[str, dict[str, Any]] = {}
    built: dict[str, Any] = {}
    for name in names:
        v = VARIANTS[name]
        results[name] = {"reason": v.available(device)}
        if results[name]["reason"] is None:
            t0 = time.perf_counter()
            built[name] = v.build(make_model(device), device)
            results[name]["build_s"] = time.perf_counter() - t0
            inprocess.progress("bench.model", f"built {name} in {results[name]['build_s']:.1f} s")
    benches = []
    for w in WORKLOADS:
        fns = {name: workloads(obj, inputs)[w] for name, obj in built.items()}
        for name, fn in fns.items():  # first call: compilation/capture, reported apart
            t0 = time.perf_counter()
            fn()
            inprocess.sync(device)
            results[name].setdefault("first_call_s", {})[w] = time.perf_counter() - t0
        # No extra warm-up: the first call above and time_interleaved's calibration call are
        # two untimed calls per column already (each decode call is 127 tokens).
        timings = time_interleaved(
            fns, repeat=repeat, warmup=0, device=device, settle_s=SETTLE_S[device]
        )
        inprocess.progress("bench.model", f"timed {w}: {', '.join(map(str, timings.values()))}")
        for name, t in timings.items():
            meta = {"variant": name, "workload": w, "device": device}
            meta["torch_threads"] = torch.get_num_threads()
            results[name][w] = inprocess.pyperf_benchmark(f"model/{w}/{name}/{device}", t, meta)
            benches.append(results[name][w])
    inprocess.write_suite(output, benches)
    for name, obj in built.items():
        results[name]["max_logit_diff"], results[name]["chosen"] = _logit_diff(obj, device)
    if device == "cuda":  # allocated bytes: exact in this process, whatever ran before
        for name, obj in built.items():
            fns = workloads(obj, inputs)
            results[name]["peak"] = {w: peak_memory(fns[w], device) for w in WORKLOADS}
    else:
        _peak_memory_per_variant(results, list(built), device)
    inprocess.progress("bench.model", "peak memory measured")
    return results


def _own_args(argv):
    import argparse

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", default=None)
    ap.add_argument("--peak-memory-child", nargs=2, default=None)
    inprocess.add_mode_args(ap)
    ns, _ = ap.parse_known_args(argv)
    ns.device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return ns


def _inprocess_args(argv, device: str):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__)
    ap.add_argument("--device", default=device)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", default=None)
    inprocess.add_mode_args(ap)
    ap.add_argument("--repeat", type=inprocess.positive_int, default=None, help="samples")
    ap.add_argument("-o", "--output", default=None, help="pyperf JSON file to write")
    return inprocess.parse_args(ap, argv)


def main() -> int:
    own = _own_args(sys.argv[1:])
    settings["quick"] = own.quick
    if own.peak_memory_child:
        _peak_memory_child(*own.peak_memory_child, own.device)
        return 0
    device = own.device
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        print(
            f"error: --device must be cpu, or cuda with a GPU present; got {device!r}",
            file=sys.stderr,
        )
        return 2
    names = (own.variants or ",".join(VARIANTS)).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: --variants has unknown {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    mode = own.mode or inprocess.default_mode(device, own.quick)
    if mode == "workers":
        return _main_workers(own, names)
    args = _inprocess_args(sys.argv[1:], device)
    repeat = args.repeat or (inprocess.QUICK_REPEAT if own.quick else inprocess.FULL_REPEAT)
    output = Path(args.output) if args.output else _default_output(device, own.quick)
    results = run_inprocess(names, device, repeat, output)
    _report(results, device, own.quick, output, mode=mode, repeat=repeat)
    return 0


def _default_output(device: str, quick: bool) -> Path:
    return RESULTS / device_name(device) / ("model-quick.json" if quick else "model.json")


def _main_workers(own, names: list[str]) -> int:
    import pyperf

    device = own.device

    def add_cmdline_args(cmd, args):
        cmd += ["--device", args.device, "--variants", ",".join(names), "--mode", "workers"]
        if args.quick:
            cmd.append("--quick")

    runner_kw = dict(processes=1, values=5, warmups=1, min_time=0.05) if own.quick else {}
    runner = pyperf.Runner(
        program_args=("-m", "bench.model"), add_cmdline_args=add_cmdline_args, **runner_kw
    )
    runner.argparser.add_argument("--device", default=device)
    runner.argparser.add_argument("--quick", action="store_true")
    runner.argparser.add_argument("--variants", default=None)
    inprocess.add_mode_args(runner.argparser)
    args = runner.parse_args()
    args.copy_env = True
    if not args.worker and not args.output:
        args.output = str(_default_output(device, own.quick))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).unlink(missing_ok=True)

    variants = [VARIANTS[n] for n in names]
    results: dict[str, dict[str, Any]] = {}
    for v in variants:
        why = v.available(device)
        results[v.name] = {"reason": why}
        if why is not None:
            continue
        for w in WORKLOADS:
            results[v.name][w] = runner.bench_time_func(
                f"model/{w}/{v.name}/{device}",
                _time_func(v, w, device),
                metadata={
                    "variant": v.name,
                    "workload": w,
                    "device": device,
                    "torch_threads": torch.get_num_threads(),
                },
            )
    if args.worker:
        return 0
    for v in variants:
        if results[v.name]["reason"] is None:
            diff, chosen = max_logit_diff(v, device)
            results[v.name]["max_logit_diff"], results[v.name]["chosen"] = diff, chosen
    _peak_memory_all(results, variants, device)
    _report(results, device, own.quick, Path(args.output), mode="workers", repeat=None)
    return 0


def _mode_note(results: dict, device: str, quick: bool, mode: str, repeat: int | None) -> str:
    """What the table's cells are: mode, samples per cell, optimize() settings, peak memory."""
    if mode == "inprocess":
        lines = [
            f"mode inprocess: every column in one process, {repeat} interleaved values per cell "
            "(ryzen_opt.timing.time_interleaved"
            + (", CUDA events" if device == "cuda" else "")
            + "); peak memory "
            + (
                "in this process (max allocated)"
                if device == "cuda"
                else "in one fresh process per variant (workloads b1, b16, ttft in order)"
            )
        ]
    else:
        lines = [
            "mode workers: pyperf worker processes"
            + (" (1 process x 5 values per cell)" if quick else "")
            + "; peak memory in one fresh process per cell"
        ]
    if quick:
        opt = ", ".join(f"{k}={v}" for k, v in QUICK_OPTIMIZE.items())
        lines.append(
            f"quick mode: fewer values per cell than the full run; optimize() with "
            f"OptimizeConfig({opt}) instead of its defaults (repeat=20, warmup=3)"
        )
    firsts = [
        f"{n} {r['build_s']:.1f} s"
        for n, r in results.items()
        if r.get("reason") is None and "build_s" in r
    ]
    if firsts:
        lines.append("build time (optimize() measuring, ONNX export...): " + ", ".join(firsts))
    compiles = [
        f"{n} {max(r['first_call_s'].values()):.1f} s"
        for n, r in results.items()
        if r.get("first_call_s")
    ]
    if compiles:
        lines.append("slowest first call (compilation, capture): " + ", ".join(compiles))
    return "".join(f"{line}\n" for line in lines)


def _report(
    results: dict,
    device: str,
    quick: bool,
    json_path: Path,
    mode: str = "workers",
    repeat: int | None = None,
) -> None:
    headers = [
        "variant",
        "TTFT 16x128",
        "decode b1 tok/s",
        "decode b16 tok/s",
        "speed-up ttft/b1/b16 [95% bootstrap]",
        "peak MB (ttft/b1/b16)",
        "max |dlogit|",
    ]
    rows, records = [], {}
    base = results.get("baseline", {})
    for name, r in results.items():
        if r["reason"] is not None:
            rows.append([name, r["reason"], "", "", "", "", ""])
            continue
        ttft = r["ttft"].median()
        tps = {b: b * NEW_TOKENS / r[f"decode b{b}"].median() for b in DECODE_BATCHES}
        speed = "-"
        if base.get("reason") is None and "ttft" in base:
            cells = [
                with_interval(base[w].median() / r[w].median(), speedup_interval(base[w], r[w]))
                for w in WORKLOADS
            ]
            speed = " / ".join(cells)
        peaks = r.get("peak") or {}
        peak_s = " / ".join(
            "-" if peaks.get(k) is None else f"{peaks[k] / 2**20:.1f}" for k in WORKLOADS
        )
        rows.append(
            [
                name,
                f"{ttft * 1e3:.2f} ms",
                f"{tps[1]:,.0f}",
                f"{tps[16]:,.0f}",
                speed,
                peak_s,
                f"{r['max_logit_diff']:.2e}",
            ]
        )
        records[name] = {
            "ttft_s": ttft,
            "decode_tok_s": {str(b): tps[b] for b in tps},
            "peak_bytes": peaks,
            "max_logit_diff": r["max_logit_diff"],
            "chosen": r.get("chosen", {}),
            "samples_ttft_s": list(r["ttft"].get_values()),
            "build_s": r.get("build_s"),
            "first_call_s": r.get("first_call_s"),
        }
    rows.append(
        [
            "reference report (other machine)",
            f"{REFERENCE_REPORT['ttft_ms']} ms",
            f"{REFERENCE_REPORT['decode_tok_s']:.0f} (batch n/a)",
            "-",
            "-",
            f"{REFERENCE_REPORT['peak_mb']}",
            "-",
        ]
    )
    env = environment(device)
    title = f"bench.model on {where(env)}, {env['torch_threads']} threads"
    if quick:
        title += f", quick: {repeat or 5} values per cell"
    print_table(title, headers, rows)
    # What optimize() installed (its own decisions, made again in this process from the cache).
    opt = records.get("optimize()")
    notes = _mode_note(results, device, quick, mode, repeat)
    if opt is not None:
        picks = ", ".join(f"{k} -> {b}" for k, b in opt["chosen"].items())
        notes += f"optimize() chose: {picks or 'nothing (unchanged)'}\n"
    print(notes, end="")
    json_path.with_suffix(".md").write_text(
        f"# {title}\n\n"
        + markdown_table(headers, rows)
        + (f"\n{notes}" if notes else "")
        + f"\nCommand: `{env['command']}` (commit {env['commit']})\n\nVersions: {env['versions']}\n"
    )
    write_json(
        json_path.with_name(json_path.stem + "-summary.json"),
        {
            "environment": env,
            "quick": quick,
            "mode": mode,
            "values_per_cell": repeat,
            "quick_optimize_config": QUICK_OPTIMIZE if quick else None,
            "new_tokens": NEW_TOKENS,
            "prefill": PREFILL,
            "variants": records,
            "reference_report": REFERENCE_REPORT,
        },
    )
    print(f"pyperf JSON: {json_path}  summary: {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    raise SystemExit(main())
