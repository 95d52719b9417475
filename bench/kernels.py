"""Kernel benchmarks: the PyTorch baseline next to every registered backend, one pyperf suite.

    python -m bench.kernels [--device cpu|cuda] [--quick] [-o results.json] [pyperf options]

For each case (op, shape, dtype) the "torch" column is what a PyTorch user already has
(``torch.matmul``/``addmm`` + activation, ``scaled_dot_product_attention``,
``F.layer_norm``), and every backend registered for the op that can serve the input on this
device gets a column with its speed-up over torch. All columns of a case run on identical
inputs (one seed per case), through pyperf ``bench_time_func`` (worker processes, warm-ups,
loop calibration), with the same thread count. Before timing, the parent process calls each
candidate once on the case's inputs and records its first-call time (JIT compilation or
autotuning included) and its relative error against the torch output: a candidate whose
error exceeds the dtype tolerance is reported as wrong, with no speed-up.

Results: pyperf JSON (``python -m pyperf show`` / ``compare_to`` read it) in
``bench/results/<device>/kernels.json`` unless ``-o`` is given, plus ``kernels.md`` with the
side-by-side table and environment.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import RESULTS, device_name, environment, markdown_table, print_table, write_json
from ryzen_opt.kernels.reference import TOLERANCE


@dataclass
class Case:
    """One benchmarked call: an op on fixed inputs, its torch baseline and its work."""

    op: str
    label: str
    dtype: torch.dtype
    make: Callable[[str], tuple]  # device -> args for the ryzen_opt op
    torch_fn: Callable[..., Any]  # the baseline, same args
    flops: float = 0.0
    bytes: float = 0.0

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def _rand(*shape, dtype, device, gen):
    if device.startswith("probe:"):  # uninitialised: for supports() decisions only
        return torch.empty(*shape, dtype=dtype, device=device.split(":", 1)[1])
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _matmul_case(m, k, n, dtype, label, epilogue=None, seed=0) -> Case:
    def make(device):
        g = _gen(seed)
        a = _rand(m, k, dtype=dtype, device=device, gen=g)
        b = _rand(k, n, dtype=dtype, device=device, gen=g) / math.sqrt(k)
        bias = _rand(n, dtype=dtype, device=device, gen=g) if epilogue else None
        return (a, b, bias, "gelu" if epilogue == "gelu" else None, None, None)

    def torch_fn(a, b, bias, act, residual, out_dtype):
        if bias is None:
            return torch.matmul(a, b)
        y = torch.addmm(bias, a, b)
        return F.gelu(y) if act == "gelu" else y

    esize = torch.finfo(dtype).bits // 8
    return Case(
        "matmul", label, dtype, make, torch_fn, 2.0 * m * n * k, esize * (m * k + k * n + m * n)
    )


def _attention_case(b, h, s, d, causal, dtype, label, seed=1) -> Case:
    def make(device):
        g = _gen(seed)
        q, k, v = (_rand(b, h, s, d, dtype=dtype, device=device, gen=g) for _ in range(3))
        return (q, k, v, causal, None, None)

    def torch_fn(q, k, v, causal, scale, mask):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    flops = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    esize = torch.finfo(dtype).bits // 8
    return Case("attention", label, dtype, make, torch_fn, flops, esize * 4 * b * h * s * d)


def _decode_case(b, h, length, d, dtype, label, seed=2) -> Case:
    def make(device):
        g = _gen(seed)
        q = _rand(b, h, d, dtype=dtype, device=device, gen=g)
        kc = _rand(b, h, length, d, dtype=dtype, device=device, gen=g)
        vc = _rand(b, h, length, d, dtype=dtype, device=device, gen=g)
        lengths = torch.full((b,), length, dtype=torch.int64, device=device.split(":")[-1])
        return (q, kc, vc, lengths, None)

    def torch_fn(q, kc, vc, lengths, scale):
        # What a PyTorch decoder does each step: SDPA with a 1-token query over the cache.
        return F.scaled_dot_product_attention(q[:, :, None], kc, vc)[:, :, 0]

    esize = torch.finfo(dtype).bits // 8
    return Case(
        "decode_attention",
        label,
        dtype,
        make,
        torch_fn,
        4.0 * b * h * length * d,
        esize * 2 * b * h * length * d,
    )


def _layer_norm_case(rows, n, dtype, label, seed=3) -> Case:
    def make(device):
        g = _gen(seed)
        x = _rand(rows, n, dtype=dtype, device=device, gen=g)
        r = _rand(rows, n, dtype=dtype, device=device, gen=g)
        w = _rand(n, dtype=dtype, device=device, gen=g)
        bias = _rand(n, dtype=dtype, device=device, gen=g)
        return (x, w, bias, 1e-5, r)

    def torch_fn(x, w, bias, eps, r):
        h = x + r
        return F.layer_norm(h, (n,), w, bias, eps), h

    esize = torch.finfo(dtype).bits // 8
    return Case("layer_norm", label, dtype, make, torch_fn, 8.0 * rows * n, esize * 4 * rows * n)


def _copy_case(nbytes: int, dtype: torch.dtype, device: str) -> Case:
    """Memory-bandwidth ceiling: a device-to-device copy (bytes read + written)."""
    numel = nbytes // (torch.finfo(dtype).bits // 8)

    def make(dev):
        g = _gen(4)
        return (
            _rand(numel, dtype=dtype, device=dev, gen=g),
            torch.empty(numel, dtype=dtype, device=dev.split(":")[-1]),
        )

    return Case(
        "ceiling",
        f"copy {nbytes >> 20} MiB",
        dtype,
        make,
        lambda src, dst: dst.copy_(src),
        0.0,
        2.0 * nbytes,
    )


def cases(device: str, quick: bool) -> list[Case]:
    """The benchmark list. Deterministic: pyperf workers rebuild it to find their task."""
    out: list[Case] = []
    if device == "cpu":
        f32 = torch.float32
        # --quick keeps one case per goal of the CPU kernels (about 2 minutes on 2 cores).
        squares = (1024,) if quick else (256, 512, 1024, 2048)
        out += [_matmul_case(s, s, s, f32, f"square {s}") for s in squares]
        # The model's shapes: 16 sequences x 128 tokens, width 256, MLP 512, vocab 2048.
        out.append(_matmul_case(2048, 256, 512, f32, "fc1 2048x256x512 +bias+gelu", "gelu"))
        if not quick:
            out.append(_matmul_case(2048, 512, 256, f32, "fc2 2048x512x256 +bias", "bias"))
            out.append(_matmul_case(2048, 256, 768, f32, "qkv 2048x256x768"))
            out.append(_matmul_case(2048, 256, 2048, f32, "head 2048x256x2048"))
            out.append(_matmul_case(2048, 2048, 256, f32, "2048x2048x256"))
        for m in (16,) if quick else (1, 16):
            out.append(_matmul_case(m, 256, 768, f32, f"decode qkv {m}x256x768"))
        out.append(_attention_case(16, 4, 128, 64, True, f32, "16x4x128x64 causal"))
        out.append(_attention_case(1, 8, 4096, 64, True, f32, "1x8x4096x64 causal"))
        for b in (1, 16):
            for length in (4096,) if quick else (128, 1024, 4096):
                out.append(_decode_case(b, 4, length, 64, f32, f"b{b} h4 cache{length} d64"))
        out.append(_layer_norm_case(2048, 256, f32, "2048x256 +residual"))
        out.append(_copy_case(64 << 20, f32, device))
    else:
        bf16 = torch.bfloat16
        for s in (4096, 8192):
            out.append(_matmul_case(s, s, s, bf16, f"square {s}"))
        out.append(_matmul_case(8192, 4096, 4096, bf16, "8192x4096x4096 +bias+gelu", "gelu"))
        for m in (1, 16, 64):
            out.append(_matmul_case(m, 4096, 4096, bf16, f"skinny {m}x4096x4096"))
        for d in (64, 128):
            for s in (1024, 4096) if quick else (1024, 4096, 16384):
                for causal in (False, True):
                    b, h = max(1, 16384 // s), 2048 // d
                    tag = "causal" if causal else "full"
                    out.append(_attention_case(b, h, s, d, causal, bf16, f"{b}x{h}x{s}x{d} {tag}"))
        for b in (8, 64):
            for length in (4096, 32768):
                if quick and length > 4096 and b > 8:
                    continue
                out.append(_decode_case(b, 8, length, 128, bf16, f"b{b} h8 cache{length} d128"))
        out.append(_layer_norm_case(16384, 4096, bf16, "16384x4096 +residual"))
        out.append(_copy_case(1 << 30, bf16, device))
    return out


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


def _bench_name(case: Case, backend: str, device: str) -> str:
    return f"{case.op}/{case.label}/{backend}/{case.dtype_name}/{device}"


def _parse_own_args(argv: list[str]) -> tuple[str, bool, int | None]:
    import argparse

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ns, _ = ap.parse_known_args(argv)
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, ns.quick, ns.threads


def main() -> int:  # noqa: C901 - one linear script
    import pyperf

    device, quick, threads = _parse_own_args(sys.argv[1:])
    if device not in ("cpu", "cuda"):
        print(f"error: --device must be cpu or cuda, got {device!r}", file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if threads is not None:
        torch.set_num_threads(threads)

    def add_cmdline_args(cmd, args):
        cmd += ["--device", args.device]
        if args.quick:
            cmd.append("--quick")
        if args.threads:
            cmd += ["--threads", str(args.threads)]

    # --quick: one worker process of 5 values per benchmark (about 2 minutes on 2 cores);
    # the default keeps pyperf's statistics (several processes) for committed results.
    runner_kw = dict(processes=1, values=5, warmups=1, min_time=0.05) if quick else {}
    runner = pyperf.Runner(
        program_args=("-m", "bench.kernels"), add_cmdline_args=add_cmdline_args, **runner_kw
    )
    runner.argparser.add_argument("--device", default=device, choices=("cpu", "cuda"))
    runner.argparser.add_argument("--quick", action="store_true")
    runner.argparser.add_argument("--threads", type=int, default=None)
    args = runner.parse_args()
    args.copy_env = True  # workers need TRITON_INTERPRET, CUDA_VISIBLE_DEVICES, cache dirs
    is_worker = args.worker
    out_dir = RESULTS / (device_name(device) if not is_worker else "cpu")
    if not is_worker and not args.output:
        out_dir.mkdir(parents=True, exist_ok=True)
        args.output = str(out_dir / ("kernels-quick.json" if quick else "kernels.json"))
        Path(args.output).unlink(missing_ok=True)

    rows: list[dict[str, Any]] = []
    for case in cases(device, quick):
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
    _report(rows, device, quick, Path(args.output))
    return 0


def _median(bench) -> float | None:
    return None if bench is None else bench.median()


def _rate(case: Case, seconds: float | None) -> str:
    if seconds is None or seconds <= 0:
        return "-"
    if case.flops:
        return f"{case.flops / seconds / 1e9:,.1f} GFLOP/s"
    return f"{case.bytes / seconds / 1e9:,.1f} GB/s"


def _report(rows: list[dict], device: str, quick: bool, json_path: Path) -> None:
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
            rec["backends"][b] = {
                "median_s": tb,
                "speedup": t / tb if tb else None,
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
            line += [info.get("wrong") or f"{t / tb:.2f}x", _rate(case, tb)]
        table.append(line)
        records.append(rec)
    env = environment(device)
    ceilings = _ceilings(records)
    ceil_text = ", ".join(f"{k}: {v}" for k, v in ceilings.items())
    title = f"bench.kernels on {env.get('gpu', env['cpu'])}, {env['torch_threads']} threads"
    print_table(title + " (speed-up = torch time / backend time)", headers, table)
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
        f"# {title}\n\nSpeed-up = torch time / backend time, same inputs, one pyperf suite.\n\n",
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
        {"environment": env, "quick": quick, "ceilings": ceilings, "cases": records},
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
