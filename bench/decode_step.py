"""Where one decode step's time goes: the model's eager step against each fast path.

    python -m bench.decode_step [--device cpu|cuda] [--batches 1,16] [--past 64] [-o out.json]

For each batch size, on the default model shape (random weights, seed 0), after a cache of
``--past`` tokens, in one process on the same inputs:

* ``eager``: the model's own one-token step (``model(ids, cache)``), the baseline;
* each fast path that serves the device, called as ``optimize()`` installs it (including its
  Python around the kernel: routing, cache view, input copies);
* the kernel alone: on CUDA the graph replay timed with CUDA events (what the GPU spends per
  step), on the CPU the fused Numba call without the Python wrapper.

Samples interleave the variants (ABBA through :func:`ryzen_opt.timing.compare`); the figures
are medians of per-call times. This is a diagnostic companion of ``bench.model``, whose decode
columns include the generation loop around the step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.common import (
    RESULTS,
    device_name,
    environment,
    markdown_table,
    print_table,
    where,
    write_json,
)
from ryzen_opt.models import ModelConfig, SimpleTransformerModel
from ryzen_opt.optimization.fastpaths import CudaGraphDecode, NumbaFusedDecode, TritonGraphDecode
from ryzen_opt.timing import compare


def _paths(device: str):
    if device == "cuda":
        return [CudaGraphDecode(), TritonGraphDecode()]
    return [NumbaFusedDecode("serial"), NumbaFusedDecode("pool")]


def _kernel_only(path, model, ids, static, past):
    """A callable running only the compiled part of ``path`` for this step."""
    if isinstance(path, CudaGraphDecode):
        g = path.graphs[ids.shape[0]]
        path.load_inputs(g, ids, past)
        return g.graph.replay
    from ryzen_opt.kernels.numba.decode_step import decode_step

    b = ids.shape[0]
    head, tail = path.kernel_args(model, b)
    k_arr, v_arr = static.buffer.arrays
    ids_np = ids.reshape(b).contiguous().numpy()
    logits = torch.empty(b, model.config.vocab_size).numpy()

    def run():
        decode_step(*head, ids_np, past, k_arr, v_arr, logits, *tail)

    return run


def measure(device: str, batches: list[int], past: int, repeat: int) -> list[dict]:
    """Rows of (batch, variant, median seconds, speed-up vs eager with CI)."""
    torch.manual_seed(0)
    model = SimpleTransformerModel(ModelConfig()).to(device).eval()
    dev = torch.device(device)
    rows = []
    for b in batches:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(0, model.config.vocab_size, (b, past + 1), generator=g).to(device)
        with torch.no_grad():
            _, cache = model(ids[:, :past])
        step_ids = ids[:, past:].contiguous()

        def eager(m=model, x=step_ids, c=cache):
            return m(x, c)[0]

        for path in _paths(device):
            reason = path.why_not(model)
            if reason is not None:
                rows.append({"batch": b, "variant": path.name, "reason": reason})
                continue
            with torch.no_grad():
                static = path.adopt(model, cache)
                out, after = path(model, step_ids, static, past)
                del after

            def call(p=path, m=model, x=step_ids, c=static):
                return p(m, x, c, past)[0]

            kernel = _kernel_only(path, model, step_ids, static, past)
            with torch.no_grad():
                ref = eager()
                err = float((out - ref).norm() / ref.norm())
                full = compare(eager, call, repeat=repeat, warmup=3, device=dev)
                bare = compare(eager, kernel, repeat=repeat, warmup=3, device=dev)
            rows.append(
                {
                    "batch": b,
                    "variant": path.name,
                    "eager_s": full.baseline.median,
                    "call_s": full.candidate.median,
                    "call_speedup": [full.speedup, full.ci_low, full.ci_high],
                    "kernel_s": bare.candidate.median,
                    "kernel_speedup": [bare.speedup, bare.ci_low, bare.ci_high],
                    "rel_error": err,
                    "n": full.baseline.n,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decode_step", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--past", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args(argv)
    if a.device not in ("cpu", "cuda") or (a.device == "cuda" and not torch.cuda.is_available()):
        ap.error(f"argument --device: must be cpu, or cuda with a GPU present; got {a.device!r}")
    try:
        batches = [int(x) for x in a.batches.split(",")]
    except ValueError:
        ap.error(f"argument --batches: comma-separated ints expected, got {a.batches!r}")
    if not batches or min(batches) < 1:
        ap.error(f"argument --batches: every batch must be >= 1, got {a.batches!r}")
    max_len = ModelConfig().max_seq_len
    if not 1 <= a.past < max_len:
        ap.error(f"argument --past: must lie in [1, {max_len - 1}], got {a.past}")
    if a.repeat < 3:
        ap.error(f"argument --repeat: must be >= 3, got {a.repeat}")
    t0 = time.perf_counter()
    rows = measure(a.device, batches, a.past, a.repeat)
    env = environment(a.device)
    headers = [
        "batch",
        "variant",
        "eager step",
        "fast path call",
        "speed-up",
        "kernel only",
        "speed-up",
        "rel err",
    ]
    table = []
    for r in rows:
        if "reason" in r:
            table.append([str(r["batch"]), r["variant"], "-", r["reason"], "", "", "", ""])
            continue
        cs, ks = r["call_speedup"], r["kernel_speedup"]
        table.append(
            [
                str(r["batch"]),
                r["variant"],
                f"{r['eager_s'] * 1e6:.1f} us",
                f"{r['call_s'] * 1e6:.1f} us",
                f"{cs[0]:.2f}x [{cs[1]:.2f}, {cs[2]:.2f}]",
                f"{r['kernel_s'] * 1e6:.1f} us",
                f"{ks[0]:.2f}x [{ks[1]:.2f}, {ks[2]:.2f}]",
                f"{r['rel_error']:.1e}",
            ]
        )
    title = f"bench.decode_step on {where(env)}, after {a.past} tokens"
    print_table(title, headers, table)
    out = Path(a.output) if a.output else RESULTS / device_name(a.device) / "decode_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"environment": env, "past": a.past, "rows": rows})
    out.with_suffix(".md").write_text(
        f"# {title}\n\n"
        + markdown_table(headers, table)
        + f"\nCommand: `{env['command']}` (commit {env['commit']})\n\nVersions: {env['versions']}\n"
    )
    print(f"JSON: {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
