"""Training kernels, forward + backward, against the eager PyTorch composition and its
torch.compile, on one device, side by side.

    python -m bench.train_kernels --device cuda [--dtype bfloat16] [--repeat 20] [--out DIR]
    TRITON_INTERPRET=1 python -m bench.train_kernels --device cpu --quick   # a smoke run

Shapes are a Llama-1B step (hidden 2048, MLP 5632, 32 heads of 64 with 4 KV heads, vocab
32000) at 4096 tokens (batch 2 x sequence 2048); GELU takes GPT-2's 4x MLP (8192). Each
column runs forward and backward (``torch.autograd.grad`` of fixed random output gradients)
on the same inputs; samples interleave the columns in a balanced order
(:func:`ryzen_opt.timing.time_interleaved`, CUDA events on the GPU). The baselines:

* ``eager``: the PyTorch composition a model runs (HF Llama's RMSNorm in float32,
  ``rotate_half``, ``F.silu(g) * u``, ``F.gelu``, ``F.layer_norm``), each with its residual
  add; attention is ``F.scaled_dot_product_attention`` (on the GPU its flash or cuDNN
  kernels, forward and backward); the LM-head loss is HF's
  ``F.cross_entropy(F.linear(h, w).float(), labels)`` (HF's causal-LM loss upcasts the
  logits);
* ``compile``: ``torch.compile`` of that same function (default mode), compiled during the
  warm-up;
* ``triton``: :mod:`ryzen_opt.kernels.triton.training`.

``--launch-compare`` adds a ``triton, Triton's launch`` column: the same kernels launched
through Triton's own ``kernel[grid](...)`` path instead of the cached direct launch
(:mod:`ryzen_opt.kernels.triton._launcher`), timed in the same interleaved rounds, so the
launcher's effect on an eager step is a ratio of one run.

On CUDA each column is also captured in a CUDA graph and its replays timed (``graph``
columns): that removes the host's Python, custom-op dispatch and Triton launch time, which
at these sizes is comparable to a norm's GPU time and which a training step's GPU work
hides. ``--no-graph`` leaves them out.

Peak memory (device bytes above the inputs, forward + backward) is measured for the
LM-head loss, where the fused op never builds the ``(tokens, vocab)`` logits. ``rel_err``
is the largest ``||triton - eager|| / ||eager||`` over outputs and input gradients (both in
the run's dtype: agreement with eager, not an error against exact math; the tests check
that). Writes ``train_kernels.json`` and ``train_kernels.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import (
    RESULTS,
    cuda_graphed,
    device_name,
    environment,
    markdown_table,
    print_table,
    where,
    write_json,
)
from ryzen_opt.timing import peak_memory, time_interleaved

# A Llama-1B step (TinyLlama-1.1B's widths) at 4096 tokens; --quick: a CPU smoke size.
FULL = {
    "tokens": 4096,
    "batch": 2,
    "hidden": 2048,
    "mlp": 5632,
    "gelu_mlp": 8192,
    "heads": 32,
    "kv_heads": 4,
    "head_dim": 64,
    "vocab": 32000,
}
QUICK = {
    "tokens": 24,
    "batch": 2,
    "hidden": 32,
    "mlp": 48,
    "gelu_mlp": 64,
    "heads": 2,
    "kv_heads": 1,
    "head_dim": 16,
    "vocab": 300,
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Case:
    """One op: leaves that take gradients, the eager composition and the Triton op."""

    op: str
    shape: str
    leaves: list[torch.Tensor]
    eager: Callable[..., tuple]
    triton: Callable[..., tuple]


def _hf_rms_norm(h, w, eps):
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return w * hf.to(h.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_tables(s, d, device, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    freqs = torch.arange(s, device=device, dtype=torch.float32)[:, None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def cases(device: str, dtype: torch.dtype, s: dict) -> list[Case]:
    from ryzen_opt.kernels.triton import training as T

    g = torch.Generator(device=device).manual_seed(0)

    def mk(*shape, scale=1.0, grad=True):
        t = torch.randn(*shape, device=device, dtype=torch.float32, generator=g) * scale
        return t.to(dtype).requires_grad_(grad)

    n, h, v = s["tokens"], s["hidden"], s["vocab"]
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[::50] = -100  # some padding, as a batch of packed sequences has
    out = [
        Case(
            "linear_cross_entropy",
            f"{n}x{h} @ {v}x{h}",
            [mk(n, h), mk(v, h, scale=h**-0.5)],
            lambda x, w: (F.cross_entropy(F.linear(x, w).float(), labels),),
            lambda x, w: (T.linear_cross_entropy(x, w, labels),),
        ),
        Case(
            "rms_norm_residual",
            f"{n}x{h}",
            [mk(n, h), mk(n, h), mk(h)],
            lambda x, r, w: (_hf_rms_norm(x + r, w, 1e-6), x + r),
            lambda x, r, w: T.rms_norm_residual(x, r, w, 1e-6),
        ),
        Case(
            "layer_norm_residual",
            f"{n}x{h}",
            [mk(n, h), mk(n, h), mk(h), mk(h)],
            lambda x, r, w, b: (F.layer_norm(x + r, (h,), w, b, 1e-5), x + r),
            lambda x, r, w, b: T.layer_norm_residual(x, r, w, b, 1e-5),
        ),
        Case(
            "swiglu",
            f"{n}x{s['mlp']}",
            [mk(n, s["mlp"]), mk(n, s["mlp"])],
            lambda a, b: (F.silu(a) * b,),
            lambda a, b: (T.swiglu(a, b),),
        ),
        Case(
            "gelu_tanh",
            f"{n}x{s['gelu_mlp']}",
            [mk(n, s["gelu_mlp"])],
            lambda x: (F.gelu(x, approximate="tanh"),),
            lambda x: (T.gelu(x, "tanh"),),
        ),
    ]
    b, hd = s["batch"], s["head_dim"]
    seq = n // b
    cos, sin = _rope_tables(seq, hd, device, dtype)

    def rope_eager(q, k):
        c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + _rotate_half(q) * sn, k * c + _rotate_half(k) * sn

    out.append(
        Case(
            "rotary",
            f"q {b}x{s['heads']}x{seq}x{hd}, k {s['kv_heads']} heads",
            [mk(b, s["heads"], seq, hd), mk(b, s["kv_heads"], seq, hd)],
            rope_eager,
            lambda q, k: T.rotary(q, k, cos, sin),
        )
    )
    q, k, v = (
        mk(b, s["heads"], seq, hd),
        mk(b, s["kv_heads"], seq, hd),
        mk(b, s["kv_heads"], seq, hd),
    )
    out.append(
        Case(
            "attention_causal",
            f"q {b}x{s['heads']}x{seq}x{hd}, kv {s['kv_heads']} heads",
            [q, k, v],
            lambda q, k, v: (
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            ),
            lambda q, k, v: (T.attention(q, k, v, causal=True),),
        )
    )
    return out


def _fwd_bwd(fn, leaves, grads):
    def run():
        outs = fn(*leaves)
        return torch.autograd.grad(outs, leaves, grads)

    return run


def _tritons_launch(fn):
    """``fn`` with the cached direct launch turned off for its duration."""
    from ryzen_opt.kernels.triton import _launcher

    def run():
        old = _launcher.set_enabled(False)
        try:
            return fn()
        finally:
            _launcher.set_enabled(old)

    return run


def _rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    err = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = x.detach().double(), y.detach().double()
        err = max(err, float((x - y).norm() / y.norm().clamp_min(1e-30)))
    return err


def _graphed(fn):
    """``fn`` (forward + backward) captured once in a CUDA graph; returns its replay.

    Takes Python, custom-op dispatch and Triton launch time out (tens of microseconds a call,
    comparable to a norm's GPU time at these sizes): what remains is GPU time, as in a
    training step whose GPU work hides the host's launches."""
    return cuda_graphed(fn)


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def measure(
    case: Case,
    device: str,
    repeat: int,
    warmup: int,
    compile_: bool,
    graph: bool,
    launch_compare: bool = False,
) -> dict:
    leaves = case.leaves
    ref_outs = case.eager(*leaves)
    grads = [torch.randn_like(o) for o in ref_outs]
    ref_grads = torch.autograd.grad(ref_outs, leaves, grads)
    outs = case.triton(*leaves)
    tri_grads = torch.autograd.grad(outs, leaves, grads)
    row: dict = {
        "op": case.op,
        "shape": case.shape,
        "rel_err_vs_eager": _rel_err([*outs, *tri_grads], [*ref_outs, *ref_grads]),
    }
    del ref_outs, outs, ref_grads, tri_grads
    fns = {
        "eager": _fwd_bwd(case.eager, leaves, grads),
        "triton": _fwd_bwd(case.triton, leaves, grads),
    }
    if launch_compare:
        fns["triton_plain"] = _tritons_launch(fns["triton"])
    if compile_:
        try:
            compiled = torch.compile(case.eager)
            fns["compile"] = _fwd_bwd(compiled, leaves, grads)
            fns["compile"]()  # compile here, outside the timed rounds
        except Exception as e:  # a compile failure is a result, not a crash of the suite
            row["compile_error"] = _short(e)
            fns.pop("compile", None)
    timings = time_interleaved(fns, repeat=repeat, warmup=warmup, device=device)
    for name, t in timings.items():
        row[f"{name}_s"] = t.median
        row[f"{name}_iqr_s"] = t.iqr
        row["n"] = t.n
    row["speedup_vs_eager"] = row["eager_s"] / row["triton_s"]
    if "compile_s" in row:
        row["speedup_vs_compile"] = row["compile_s"] / row["triton_s"]
    if "triton_plain_s" in row:
        row["speedup_vs_tritons_launch"] = row["triton_plain_s"] / row["triton_s"]
    if case.op == "linear_cross_entropy":
        for name, fn in fns.items():
            row[f"{name}_peak_bytes"] = peak_memory(fn, device)
    if graph:
        graphed = {}
        for name, fn in fns.items():
            if name == "triton_plain":  # the same GPU work as "triton" once captured
                continue
            try:
                graphed[name] = _graphed(fn)
            except Exception as e:  # recorded, and the other columns still run
                row[f"graph_{name}_error"] = _short(e)
        if "eager" in graphed and "triton" in graphed:
            timings = time_interleaved(graphed, repeat=repeat, warmup=warmup, device=device)
            for name, t in timings.items():
                row[f"graph_{name}_s"] = t.median
                row[f"graph_{name}_iqr_s"] = t.iqr
            row["graph_speedup_vs_eager"] = row["graph_eager_s"] / row["graph_triton_s"]
            if "graph_compile_s" in row:
                row["graph_speedup_vs_compile"] = row["graph_compile_s"] / row["graph_triton_s"]
        del graphed
    return row


def _fmt_s(s) -> str:
    return "-" if s is None else f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def _fmt_mem(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def _ratio(r: dict, key: str, failed: str) -> str:
    if key in r:
        return f"{r[key]:.2f}x"
    return "error" if failed in r else "-"


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "op",
        "shape",
        "eager",
        "compile",
        "triton",
        "vs eager",
        "vs compile",
        "graph: eager / compile / triton",
        "vs eager",
        "vs compile",
        "rel err",
        "peak mem eager / compile / triton",
    ]
    compare = any("triton_plain_s" in r for r in rows)
    if compare:
        headers[5:5] = ["triton, Triton's launch", "direct vs Triton's launch"]
    table = []
    for r in rows:
        mem = graph = ""
        if "triton_peak_bytes" in r:
            mem = " / ".join(
                _fmt_mem(r.get(f"{k}_peak_bytes")) for k in ("eager", "compile", "triton")
            )
        if "graph_triton_s" in r:
            graph = " / ".join(
                _fmt_s(r.get(f"graph_{k}_s")) for k in ("eager", "compile", "triton")
            )
        cells = [
            r["op"],
            r["shape"],
            _fmt_s(r["eager_s"]),
            _fmt_s(r.get("compile_s")),
            _fmt_s(r["triton_s"]),
            f"{r['speedup_vs_eager']:.2f}x",
            _ratio(r, "speedup_vs_compile", "compile_error"),
            graph,
            _ratio(r, "graph_speedup_vs_eager", "graph_triton_error"),
            _ratio(r, "graph_speedup_vs_compile", "graph_compile_error"),
            f"{r['rel_err_vs_eager']:.1e}",
            mem,
        ]
        if compare:
            cells[5:5] = [
                _fmt_s(r.get("triton_plain_s")),
                _ratio(r, "speedup_vs_tritons_launch", "triton_plain_error"),
            ]
        table.append(cells)
    return headers, table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_kernels", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 samples (a smoke run)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile column")
    ap.add_argument("--no-graph", action="store_true", help="leave out the CUDA-graph timings")
    ap.add_argument("--only", default=None, help="comma-separated ops to run")
    ap.add_argument(
        "--launch-compare",
        action="store_true",
        help="also time the triton column through Triton's own launch path",
    )
    ap.add_argument("--out", default=None, help="folder for train_kernels.{json,md}")
    a = ap.parse_args(argv)
    from ryzen_opt.kernels.triton import _common

    if a.device not in ("cpu", "cuda") or (a.device == "cuda" and not torch.cuda.is_available()):
        ap.error(f"argument --device: must be cpu, or cuda with a GPU present; got {a.device!r}")
    if a.device == "cpu" and not _common.INTERPRET:
        ap.error("argument --device: cpu runs the Triton kernels only under TRITON_INTERPRET=1")
    repeat = 3 if a.quick else a.repeat
    if repeat < 3:
        ap.error(f"argument --repeat: must be >= 3, got {a.repeat}")
    dtype = DTYPES[a.dtype]
    # torch.compile on the CPU is not the GPU's peer (and compiles C++ for minutes on 2 cores).
    compile_ = not a.no_compile and a.device == "cuda"
    graph = not a.no_graph and a.device == "cuda"
    all_cases = cases(a.device, dtype, QUICK if a.quick else FULL)
    names = [c.op for c in all_cases]
    only = a.only.split(",") if a.only else names
    if unknown := [o for o in only if o not in names]:
        ap.error(f"argument --only: unknown ops {unknown}; choose from {names}")
    t0 = time.perf_counter()
    rows = []
    for case in all_cases:
        if case.op not in only:
            continue
        rows.append(
            measure(case, a.device, repeat, 1 if a.quick else 3, compile_, graph, a.launch_compare)
        )
        print(f"{case.op}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
        del case
        if a.device == "cuda":
            torch.cuda.empty_cache()
    env = environment(a.device)
    headers, table = _table(rows)
    title = (
        f"bench.train_kernels on {where(env)}, {a.dtype}, forward + backward, median of "
        f"{repeat}{' (--quick)' if a.quick else ''}"
    )
    if _common.INTERPRET:
        title += " [Triton interpreter: the triton column is not a kernel speed]"
    print_table(title, headers, table)
    out = Path(a.out) if a.out else RESULTS / device_name(a.device)
    out.mkdir(parents=True, exist_ok=True)
    shapes = QUICK if a.quick else FULL
    write_json(
        out / "train_kernels.json",
        {"environment": env, "dtype": a.dtype, "shapes": shapes, "repeat": repeat, "rows": rows},
    )
    notes = "".join(
        f"\n- {r['op']}: {k.replace('_error', '')} failed: {v}"
        for r in rows
        for k, v in r.items()
        if k.endswith("_error")
    )
    (out / "train_kernels.md").write_text(
        f"# {title}\n\n"
        + markdown_table(headers, table)
        + f"\nShapes: {shapes}.{notes}\n\nCommand: `{env['command']}` (commit {env['commit']})"
        + f"\n\nVersions: {env['versions']}\n"
    )
    print(f"wrote {out / 'train_kernels.json'} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
