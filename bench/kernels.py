"""Kernel benchmarks: the PyTorch baseline next to every registered backend, one pyperf suite.

    python -m bench.kernels [--device cpu|cuda] [--quick] [--mode inprocess|workers]
                            [--only TEXT ...] [--repeat N] [-o results.json]
                            [pyperf options, workers mode]

``--only TEXT`` (repeatable) keeps the cases whose ``"<op> <label>"`` contains one of the
texts, e.g. ``--only decode`` for the decode attention and decode-size matmul cases.

For each case (op, shape, dtype) the "torch" column is what a PyTorch user already has
(``torch.matmul``/``addmm`` + activation, ``scaled_dot_product_attention``,
``F.layer_norm``; for ``lora_bgmv`` PEFT's one-pair-of-matmuls-per-adapter loop, which is
the reference), and every backend registered for the op that can serve the input on this
device gets a column with its speed-up over torch. All columns of a case run on identical
inputs (one seed per case), with the same thread count. Before timing, each candidate is
called once on the case's inputs; its first-call time (JIT compilation or autotuning
included) and its relative error against the torch output are recorded: a candidate whose
error exceeds the dtype tolerance is reported as wrong, with no speed-up.

Two modes (``bench/inprocess.py``): ``inprocess`` (default with ``--quick`` and on CUDA)
times the columns of each case in this process with ``ryzen_opt.timing.time_interleaved``
(one sample of each per round, CUDA events on GPU), ``--repeat`` samples each (5 with
``--quick``, else 15); ``workers`` uses pyperf ``bench_time_func`` (worker processes,
warm-ups, loop calibration), as the committed CPU results did.

Results: pyperf JSON (``python -m pyperf show`` / ``compare_to`` read it) in
``bench/results/<device>/kernels.json`` unless ``-o`` is given, plus ``kernels.md`` with the
side-by-side table and environment.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
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
from bench.kernel_cases import Case, cases
from ryzen_opt.kernels.reference import TOLERANCE


def candidates(case: Case, device: str, args: tuple) -> list[tuple[str, Callable, str | None]]:
    """``(backend, launcher, reason_not_served)`` for every registered backend of the op."""
    if case.op == "ceiling":
        return []
    from ryzen_opt.kernels import registry

    out = []
    for name, be in sorted(registry.backends(case.op).items()):
        try:
            reason = be.why_not(device, *args)
        except Exception as e:  # supports() must decide without reading values
            reason = f"supports() failed: {type(e).__name__}: {e}"
        out.append((name, be.launcher, reason))
    return out


def _rel_error(out, ref) -> float:
    if isinstance(out, tuple):
        return max(_rel_error(o, r) for o, r in zip(out, ref, strict=True))
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def _make_time_func(case: Case, fn: Callable, device: str):
    state: dict[str, tuple] = {}

    def time_func(loops: int) -> float:
        if "args" not in state:
            state["args"] = case.make(device)
        args = state["args"]
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(loops):
            fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return time_func


def select(case_list: list[Case], only: list[str] | None) -> list[Case]:
    """The cases whose ``"<op> <label>"`` contains one of ``only`` (all when ``only`` is empty)."""
    if not only:
        return case_list
    return [c for c in case_list if any(t in f"{c.op} {c.label}" for t in only)]


def _add_only_arg(ap) -> None:
    ap.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="TEXT",
        help="keep the cases whose '<op> <label>' contains TEXT (repeatable)",
    )


def _bench_name(case: Case, backend: str, device: str) -> str:
    return f"{case.op}/{case.label}/{backend}/{case.dtype_name}/{device}"


def _parse_own_args(argv: list[str]):
    import argparse

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    _add_only_arg(ap)
    inprocess.add_mode_args(ap)
    ns, _ = ap.parse_known_args(argv)
    ns.device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return ns


def _first_call(case: Case, name: str, fn: Callable, inputs: tuple, ref, device: str) -> dict:
    """Call a served candidate once: first-call time (JIT/autotune) and error vs torch."""
    t0 = time.perf_counter()
    out = fn(*inputs)
    inprocess.sync(device)
    info: dict[str, Any] = {"reason": None, "first_call_s": time.perf_counter() - t0}
    info["rel_error"] = _rel_error(out, ref)
    if not info["rel_error"] <= TOLERANCE[case.dtype]:
        info["wrong"] = f"wrong: rel error {info['rel_error']:.2g}"
    return info


def run_inprocess(case_list: list[Case], device: str, repeat: int, output: Path) -> list[dict]:
    """Each case's torch column and served backends timed interleaved in this process; pyperf
    JSON written to ``output``. Returns the rows ``_report`` reads."""
    from ryzen_opt.timing import time_interleaved

    rows, benches = [], []
    for case in case_list:
        inputs = case.make(device)
        ref = case.torch_fn(*inputs)
        row: dict[str, Any] = {"case": case, "backends": {}}
        fns = {"torch": lambda a=inputs, f=case.torch_fn: f(*a)}
        for name, fn, reason in candidates(case, device, case.make(f"probe:{device}")):
            if reason is not None:
                row["backends"][name] = {"reason": reason}
                continue
            row["backends"][name] = _first_call(case, name, fn, inputs, ref, device)
            # Timed even when wrong, as in workers mode: the table shows it as wrong.
            fns[name] = lambda a=inputs, f=fn: f(*a)
        # 10 ms pause after each CPU sample: numba's and torch's OpenMP workers spin briefly
        # after a parallel region, and the next column must not share the cores with them.
        settle = 0.01 if device == "cpu" else 0.0
        timings = time_interleaved(fns, repeat=repeat, warmup=2, device=device, settle_s=settle)
        inprocess.progress("bench.kernels", f"{case.op} {case.label}: {len(fns)} columns timed")
        meta = {
            "op": case.op,
            "case": case.label,
            "dtype": case.dtype_name,
            "device": device,
            "flops": case.flops,
            "bytes": case.bytes,
            "torch_threads": torch.get_num_threads(),
        }
        for name, t in timings.items():
            bench = inprocess.pyperf_benchmark(
                _bench_name(case, name, device), t, {**meta, "backend": name}
            )
            benches.append(bench)
            if name == "torch":
                row["torch"] = bench
            else:
                row["backends"][name]["bench"] = bench
        rows.append(row)
        del inputs, ref, fns
    inprocess.write_suite(output, benches)
    return rows


def _default_output(device: str, quick: bool) -> Path:
    return RESULTS / device_name(device) / ("kernels-quick.json" if quick else "kernels.json")


def main() -> int:
    own = _parse_own_args(sys.argv[1:])
    device, quick, threads = own.device, own.quick, own.threads
    if device not in ("cpu", "cuda"):
        print(f"error: --device must be cpu or cuda, got {device!r}", file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if threads is not None:
        torch.set_num_threads(threads)
    mode = own.mode or inprocess.default_mode(device, quick)
    case_list = select(cases(device, quick), own.only)
    if not case_list:
        print(f"error: no case matches --only {own.only}", file=sys.stderr)
        return 2
    if mode == "workers":
        return _main_workers(device, quick, case_list)
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__)
    ap.add_argument("--device", default=device)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    _add_only_arg(ap)
    inprocess.add_mode_args(ap)
    ap.add_argument("--repeat", type=inprocess.positive_int, default=None, help="samples")
    ap.add_argument("-o", "--output", default=None, help="pyperf JSON file to write")
    args = inprocess.parse_args(ap, sys.argv[1:])
    repeat = args.repeat or (inprocess.QUICK_REPEAT if quick else inprocess.FULL_REPEAT)
    output = Path(args.output) if args.output else _default_output(device, quick)
    rows = run_inprocess(case_list, device, repeat, output)
    _report(rows, device, quick, output, mode=mode, repeat=repeat)
    return 0


def _main_workers(  # noqa: C901 - one linear script
    device: str, quick: bool, case_list: list[Case]
) -> int:
    import pyperf

    def add_cmdline_args(cmd, args):
        cmd += ["--device", args.device, "--mode", "workers"]
        if args.quick:
            cmd.append("--quick")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        for text in args.only or ():
            cmd += ["--only", text]

    # --quick: one worker process of 5 values per benchmark (about 2 minutes on 2 cores);
    # the default keeps pyperf's statistics (several processes) for committed results.
    runner_kw = dict(processes=1, values=5, warmups=1, min_time=0.05) if quick else {}
    runner = pyperf.Runner(
        program_args=("-m", "bench.kernels"), add_cmdline_args=add_cmdline_args, **runner_kw
    )
    runner.argparser.add_argument("--device", default=device, choices=("cpu", "cuda"))
    runner.argparser.add_argument("--quick", action="store_true")
    runner.argparser.add_argument("--threads", type=int, default=None)
    _add_only_arg(runner.argparser)
    inprocess.add_mode_args(runner.argparser)
    args = runner.parse_args()
    args.copy_env = True  # workers need TRITON_INTERPRET, CUDA_VISIBLE_DEVICES, cache dirs
    is_worker = args.worker
    if not is_worker and not args.output:
        args.output = str(_default_output(device, quick))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).unlink(missing_ok=True)

    rows: list[dict[str, Any]] = []
    for case in case_list:
        # Workers make inputs lazily (each runs one benchmark); the parent makes them once per
        # case to check every candidate against torch and time its first call. The sequence of
        # bench_time_func calls must not depend on those checks: pyperf finds a worker's task
        # by its index, so a wrong candidate is still timed and reported as wrong.
        inputs = None if is_worker else case.make(device)
        # The same serve/skip decision in parent and workers, from uninitialised tensors.
        probe = case.make(f"probe:{device}")
        meta = {
            "op": case.op,
            "case": case.label,
            "dtype": case.dtype_name,
            "device": device,
            "flops": case.flops,
            "bytes": case.bytes,
            "torch_threads": torch.get_num_threads(),
        }
        row: dict[str, Any] = {"case": case, "backends": {}}
        ref = None if is_worker else case.torch_fn(*inputs)
        row["torch"] = runner.bench_time_func(
            _bench_name(case, "torch", device),
            _make_time_func(case, case.torch_fn, device),
            metadata={**meta, "backend": "torch"},
        )
        for name, fn, reason in candidates(case, device, probe):
            info: dict[str, Any] = {"reason": reason}
            if reason is None and not is_worker:
                t0 = time.perf_counter()
                out = fn(*inputs)
                if device == "cuda":
                    torch.cuda.synchronize()
                info["first_call_s"] = time.perf_counter() - t0
                info["rel_error"] = _rel_error(out, ref)
                if not info["rel_error"] <= TOLERANCE[case.dtype]:
                    info["wrong"] = f"wrong: rel error {info['rel_error']:.2g}"
            if reason is None:
                info["bench"] = runner.bench_time_func(
                    _bench_name(case, name, device),
                    _make_time_func(case, fn, device),
                    metadata={**meta, "backend": name},
                )
            row["backends"][name] = info
        rows.append(row)
        del inputs, ref

    if is_worker:
        return 0
    _report(rows, device, quick, Path(args.output), mode="workers", repeat=None)
    return 0


def _median(bench) -> float | None:
    return None if bench is None else bench.median()


def _rate(case: Case, seconds: float | None) -> str:
    if seconds is None or seconds <= 0:
        return "-"
    if case.flops:
        return f"{case.flops / seconds / 1e9:,.1f} GFLOP/s"
    return f"{case.bytes / seconds / 1e9:,.1f} GB/s"


def _report(
    rows: list[dict],
    device: str,
    quick: bool,
    json_path: Path,
    mode: str = "workers",
    repeat: int | None = None,
) -> None:
    from ryzen_opt.timing import format_seconds

    served = sorted({b for r in rows for b, i in r["backends"].items() if i["reason"] is None})
    headers = ["op", "case", "dtype", "torch", "torch rate"]
    for b in served:
        headers += [f"{b} speed-up", f"{b} rate"]
    table, records, notes, firsts = [], [], [], []
    for r in rows:
        case, t = r["case"], _median(r["torch"])
        line = [case.op, case.label, case.dtype_name, format_seconds(t), _rate(case, t)]
        rec = {
            "op": case.op,
            "case": case.label,
            "dtype": case.dtype_name,
            "torch_s": t,
            "flops": case.flops,
            "bytes": case.bytes,
            "backends": {},
        }
        for b, info in sorted(r["backends"].items()):
            tb = _median(info.get("bench"))
            ci = speedup_interval(r["torch"], info.get("bench")) if tb else None
            rec["backends"][b] = {
                "median_s": tb,
                "speedup": t / tb if tb else None,
                "speedup_ci": None if ci is None else list(ci),
                "reason": info["reason"] or info.get("wrong"),
                "rel_error": info.get("rel_error"),
                "first_call_s": info.get("first_call_s"),
            }
            if info["reason"] is not None and b in served:
                notes.append(f"{b} / {case.op} {case.label}: not served: {info['reason']}")
            if info.get("first_call_s") is not None:
                firsts.append(
                    [
                        b,
                        case.op,
                        case.label,
                        format_seconds(info["first_call_s"]),
                        f"{info['rel_error']:.1e}",
                    ]
                )
        for b in served:
            info = r["backends"].get(b)
            if info is None or info["reason"] is not None:
                line += ["-", "-"]
                continue
            tb = _median(info.get("bench"))
            cell = with_interval(t / tb, speedup_interval(r["torch"], info.get("bench")))
            line += [info.get("wrong") or cell, _rate(case, tb)]
        table.append(line)
        records.append(rec)
    env = environment(device)
    ceilings = _ceilings(records)
    ceil_text = ", ".join(f"{k}: {v}" for k, v in ceilings.items())
    title = f"bench.kernels on {where(env)}, {env['torch_threads']} threads"
    if mode == "inprocess":
        how = (
            f"mode inprocess: every column of a case in one process, {repeat} interleaved "
            "values per cell (ryzen_opt.timing.time_interleaved"
            + (", CUDA events)" if device == "cuda" else ")")
        )
    else:
        how = "mode workers: pyperf worker processes" + (
            " (1 process x 5 values per cell)" if quick else ""
        )
    if quick:
        how += "; quick mode: one case per goal and fewer values per cell than the full run"
    print_table(
        title + " (speed-up = torch time / backend time [95% bootstrap interval])", headers, table
    )
    print(how)
    if firsts:
        print_table(
            "first call (JIT/autotune included) and relative error vs torch",
            ["backend", "op", "case", "first call", "rel error"],
            firsts,
        )
    for n in notes:
        print(n)
    print("Measured ceilings in this run:", ceil_text)
    unserved = sorted({b for r in rows for b in r["backends"]} - set(served))
    if unserved:
        print("Registered but serving no case on this device:", ", ".join(unserved))
    md = [
        f"# {title}\n\nSpeed-up = torch time / backend time, same inputs, one run; in "
        "brackets a 95% percentile-bootstrap interval of that ratio from the two cells' "
        f"values.\n\n{how}\n\n",
        markdown_table(headers, table),
    ]
    if firsts:
        md += [
            "\n## First call and relative error\n\n",
            markdown_table(["backend", "op", "case", "first call", "rel error"], firsts),
        ]
    md += [
        "".join(f"\n- {n}" for n in notes),
        f"\n\nMeasured ceilings in this run: {ceil_text}\n",
        f"\nCommand: `{env['command']}` (commit {env['commit']})\n",
        f"\nVersions: {env['versions']}\n",
    ]
    json_path.with_suffix(".md").write_text("".join(md))
    write_json(
        json_path.with_name(json_path.stem + "-summary.json"),
        {
            "environment": env,
            "quick": quick,
            "mode": mode,
            "values_per_cell": repeat,
            "ceilings": ceilings,
            "cases": records,
        },
    )
    print(f"pyperf JSON: {json_path}  summary: {json_path.with_suffix('.md')}")


def _ceilings(records: list[dict]) -> dict[str, str]:
    """The best measured compute rate (torch matmul) and copy bandwidth of this run."""
    flops = [r["flops"] / r["torch_s"] for r in records if r["op"] == "matmul" and r["torch_s"]]
    copy = [r["bytes"] / r["torch_s"] for r in records if r["op"] == "ceiling" and r["torch_s"]]
    out = {}
    if flops:
        out["peak matmul (torch)"] = f"{max(flops) / 1e9:,.1f} GFLOP/s"
    if copy:
        out["copy bandwidth"] = f"{max(copy) / 1e9:,.1f} GB/s"
    return out


if __name__ == "__main__":
    raise SystemExit(main())
