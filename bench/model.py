"""End-to-end model benchmark: the baseline ``SimpleTransformerModel`` and its variants.

    python -m bench.model [--device cpu|cuda] [--quick] [--variants baseline,...] [-o out.json]

Workloads, on the default configuration (vocab 2048, width 256, 4 heads, 2 layers, MLP 512,
context 128), random weights from seed 0 and random token ids from seed 1, identical for
every variant:

* ``ttft``: time to first token of a 16 x 128 batch prefill (one forward over the prompt and
  the greedy pick of the next token).
* ``decode b1`` / ``decode b16``: greedy KV-cache generation that fills the whole 128-token
  context: a 1-token prompt and 127 new tokens per row (the default context of 128 leaves
  no room for 128 new tokens after a prompt); tokens/s = batch x 127 / time.
* peak memory of each workload, measured in a fresh process (CUDA: max allocated; CPU: peak
  RSS growth).

Every variant is a column next to the baseline, timed by pyperf in the same suite with the
same threads; each variant's logits are compared with the baseline's (max abs difference).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, device_name, environment, markdown_table, print_table, write_json
from ryzen_opt.models import ModelConfig, SimpleTransformerModel

PREFILL = (16, 128)
DECODE_BATCHES = (1, 16)
NEW_TOKENS = 127
# The figures an earlier report gave for this model shape (other machine, other settings):
# shown for context only, never as a ratio.
REFERENCE_REPORT = {"ttft_ms": 4.18, "decode_tok_s": 564.0, "peak_mb": 262.69}


@dataclass
class Variant:
    """A way of running the model: built once per process from the baseline's weights."""

    name: str
    build: Callable[[SimpleTransformerModel, str], Any]  # -> object with forward/generate
    available: Callable[[str], str | None] = lambda device: None


def _baseline(model: SimpleTransformerModel, device: str) -> SimpleTransformerModel:
    return model


def _compiled(model: SimpleTransformerModel, device: str):
    return _CompiledModel(model)


class _CompiledModel:
    """``torch.compile`` of the baseline's forward; generation runs the same loop."""

    def __init__(self, model: SimpleTransformerModel) -> None:
        self.model = model
        self._fwd = torch.compile(model, dynamic=True)

    def __call__(self, idx, kv_cache=None):
        return self._fwd(idx, kv_cache)

    def generate(self, idx, max_new_tokens, **kw):
        # Reuse the baseline's sampling loop, with the compiled forward underneath.
        return _generate_with(self, self.model, idx, max_new_tokens)


def _generate_with(fwd, model, idx, max_new_tokens):
    with torch.no_grad():
        logits, cache = fwd(idx)
        toks = [idx]
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            if step < max_new_tokens - 1:
                logits, cache = fwd(nxt, cache)
        return torch.cat(toks, 1)


def _optimized(model: SimpleTransformerModel, device: str) -> SimpleTransformerModel:
    """``ryzen_opt.optimize()``: verified, measured kernel swaps (unchanged if none wins).

    Timing decisions are cached on disk (``~/.cache/ryzen_opt``), so only the first worker
    process pays for the measurements; each still re-verifies every swap numerically.
    """
    from ryzen_opt import optimize

    return optimize(model)


class _OrtModel:
    """The baseline exported to ONNX (fp32, KV cache) and run by ONNX Runtime on the CPU."""

    def __init__(self, model: SimpleTransformerModel) -> None:
        import tempfile

        from ryzen_opt.compress import OnnxGenerator, export_onnx

        # One export per process: the weights are the seeded baseline's, so the file is the
        # same in every pyperf worker; exporting takes seconds, so it stays out of the timing.
        self._dir = tempfile.TemporaryDirectory(prefix="ryzen_opt_bench_model_")
        path = export_onnx(model, Path(self._dir.name) / "model.onnx")
        self.gen = OnnxGenerator(path, threads=torch.get_num_threads())

    def __call__(self, idx, kv_cache=None):
        logits, present = self.gen.forward(idx.cpu().numpy(), past=kv_cache)
        return torch.from_numpy(logits), present

    def generate(self, idx, max_new_tokens, **kw):
        return torch.from_numpy(self.gen.generate(idx.cpu().numpy(), max_new_tokens))


def _onnxruntime(model: SimpleTransformerModel, device: str) -> _OrtModel:
    return _OrtModel(model)


VARIANTS: dict[str, Variant] = {
    "baseline": Variant("baseline", _baseline),
    "torch.compile": Variant("torch.compile", _compiled),
    "optimize()": Variant("optimize()", _optimized),
    "onnxruntime": Variant(
        "onnxruntime",
        _onnxruntime,
        lambda device: None if device == "cpu" else "ONNX Runtime column is CPU-only here",
    ),
}


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
    from ryzen_opt.timing import peak_memory

    model = make_model(device)
    obj = VARIANTS[variant].build(model, device)
    fn = workloads(obj, make_inputs(device))[workload]
    fn()  # warm-up: JIT and allocator caches are not the workload's peak
    print(json.dumps({"peak_bytes": peak_memory(fn, device)}))


def peak_memory_fresh(variant: str, workload: str, device: str) -> int | None:
    """Peak memory of one workload call, in a fresh process."""
    cmd = [
        sys.executable,
        "-m",
        "bench.model",
        "--peak-memory-child",
        variant,
        workload,
        "--device",
        device,
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parent.parent
    )
    try:
        return int(json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"])
    except (IndexError, ValueError, KeyError):
        print(f"peak memory of {variant}/{workload} failed: {res.stderr[-500:]}", file=sys.stderr)
        return None


def _peak_memory_all(results: dict, variants: list[Variant], device: str) -> None:
    """Peak memory of every (variant, workload), each in a fresh process.

    On CUDA the children run a few at a time (each reads its own ``max_memory_allocated``,
    so they do not disturb each other's figure; a GPU host has the cores): one at a time they
    took longer than a device call may run. On the CPU they stay one at a time, since RSS
    growth is measured there and the machine has 2 cores.
    """
    from concurrent.futures import ThreadPoolExecutor

    jobs = [
        (v.name, w)
        for v in variants
        if results[v.name]["reason"] is None
        for w in ("ttft", *[f"decode b{b}" for b in DECODE_BATCHES])
    ]
    workers = max(1, min(len(jobs), (os.cpu_count() or 1) // 4)) if device == "cuda" else 1
    with ThreadPoolExecutor(workers) as pool:
        peaks = list(pool.map(lambda j: peak_memory_fresh(j[0], j[1], device), jobs))
    for (name, w), peak in zip(jobs, peaks, strict=True):
        results[name].setdefault("peak", {})[w] = peak


def max_logit_diff(variant: Variant, device: str) -> tuple[float, dict[str, str]]:
    """Largest |logit| difference to the baseline on the prefill input, and what the variant
    chose per site and case when it carries an ``optimization_report`` (``optimize()``)."""
    inputs = make_inputs(device)
    base = make_model(device)
    with torch.no_grad():
        ref, _ = base(inputs["prefill"])
        built = variant.build(make_model(device), device)
        out, _ = built(inputs["prefill"])
    report = getattr(built, "optimization_report", None)
    chosen = {}
    if report is not None:
        chosen = {f"{s.path} {case}": b for s in report.sites for case, b in s.chosen.items()}
    return float((out.float() - ref.float()).abs().max()), chosen


def _own_args(argv):
    import argparse

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", default=None)
    ap.add_argument("--peak-memory-child", nargs=2, default=None)
    ns, _ = ap.parse_known_args(argv)
    ns.device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return ns


def main() -> int:
    import pyperf

    own = _own_args(sys.argv[1:])
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
    default = "baseline" if own.quick else "baseline,torch.compile,optimize(),onnxruntime"
    names = (own.variants or default).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: --variants has unknown {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2

    def add_cmdline_args(cmd, args):
        cmd += ["--device", args.device, "--variants", ",".join(names)]
        if args.quick:
            cmd.append("--quick")

    runner_kw = dict(processes=1, values=5, warmups=1, min_time=0.05) if own.quick else {}
    runner = pyperf.Runner(
        program_args=("-m", "bench.model"), add_cmdline_args=add_cmdline_args, **runner_kw
    )
    runner.argparser.add_argument("--device", default=device)
    runner.argparser.add_argument("--quick", action="store_true")
    runner.argparser.add_argument("--variants", default=None)
    args = runner.parse_args()
    args.copy_env = True
    out_dir = RESULTS / device_name(device)
    if not args.worker and not args.output:
        out_dir.mkdir(parents=True, exist_ok=True)
        args.output = str(out_dir / ("model-quick.json" if own.quick else "model.json"))
        Path(args.output).unlink(missing_ok=True)

    variants = [VARIANTS[n] for n in names]
    results: dict[str, dict[str, Any]] = {}
    for v in variants:
        why = v.available(device)
        results[v.name] = {"reason": why}
        if why is not None:
            continue
        for w in ("ttft", *[f"decode b{b}" for b in DECODE_BATCHES]):
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
    _report(results, device, own.quick, Path(args.output))
    return 0


def _report(results: dict, device: str, quick: bool, json_path: Path) -> None:
    headers = [
        "variant",
        "TTFT 16x128",
        "decode b1 tok/s",
        "decode b16 tok/s",
        "speed-up ttft/b1/b16",
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
            ratios = [base["ttft"].median() / ttft] + [
                base[f"decode b{b}"].median() / r[f"decode b{b}"].median() for b in DECODE_BATCHES
            ]
            speed = " / ".join(f"{x:.2f}x" for x in ratios)
        peaks = r["peak"]
        peak_s = " / ".join("-" if peaks[k] is None else f"{peaks[k] / 2**20:.1f}" for k in peaks)
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
    title = f"bench.model on {env.get('gpu', env['cpu'])}, {env['torch_threads']} threads"
    print_table(title, headers, rows)
    # What optimize() installed (its own decisions, made again in this process from the cache).
    opt = records.get("optimize()")
    notes = ""
    if opt is not None:
        picks = ", ".join(f"{k} -> {b}" for k, b in opt["chosen"].items())
        notes = f"optimize() chose: {picks or 'nothing (unchanged)'}\n"
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
            "new_tokens": NEW_TOKENS,
            "prefill": PREFILL,
            "variants": records,
            "reference_report": REFERENCE_REPORT,
        },
    )
    print(f"pyperf JSON: {json_path}  summary: {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    raise SystemExit(main())
