"""A/B timings of two forms of one Triton kernel, in one process, with the vendor kernel
alongside (GPU).

    python -m bench.triton_ab splitk [--out DIR]
    python -m bench.triton_ab attention-scale [--out DIR]
    python -m bench.triton_ab attention-bwd-split [--out DIR]
    python -m bench.triton_ab attention-bwd [--out DIR]

``splitk``: the skinny-M split-K matmul summing its fp32 partials in the same launch (the
last program of each tile, ``one``) against a second reduce kernel (``two``), with
``torch.matmul`` (cuBLAS), bf16, M 1-64 at 4096x4096, 11008x4096 and 4096x11008 (``nn.Linear``
layout); median microseconds per call eager, and per call over a replay of 20 captured calls
(GPU time). ``ryzen_opt.kernels.triton.matmul._split_k_one_pass`` is patched per form: this is
how the pass was chosen (``bench/results/h200/splitk_one_vs_two_pass.log``).

``attention-scale``: the attention forward with the softmax scale folded into one FMA per
score (``fold``) against the scale-first form (``first``,
``ryzen_opt.kernels.triton.attention._FOLD_SCALE = False``), with cuDNN SDPA, bf16, on the
attention cases of ``bench.triton_kernels`` (a 2048-wide model, 16k tokens a call); each form
autotunes on its own (``bench/results/h200/attention_fold_scale.log``).

``attention-bwd-split``: the training attention's forward + backward with each KV head's query
heads split into ``n`` shares for dK/dV (``s1``: one program per key tile and KV head, the
kernel of old; ``s<n>``: ``attention_op._DKDV_SHARES = n``, every divisor of the group), with
SDPA (``enable_gqa=True``, PyTorch's own choice of backend) alongside, bf16, grouped heads;
eager and over graph replays; ``auto`` names the share count the library picks
(``attention_bwd_split.json``).

``attention-bwd``: the same forward + backward as the library runs it (``split``: the
backward's whole tiles, every pair seen and in bounds, run without masks) against the kernels
of old (``before``: every tile masked, ``attention_op._SPLIT_MASKS = False``, 64 x 64 tiles)
and other tiles for each backward kernel (:data:`BWD_TILES`, through
``attention_op._BWD_TILES``) (``attention_bwd.json``).

Every case times its callables in interleaved rounds (:func:`ryzen_opt.timing.time_interleaved`,
CUDA events) on the same inputs. Prints one line a case; writes ``splitk_one_vs_two_pass.json``
or ``attention_fold_scale.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import cuda_graphed, environment
from ryzen_opt.timing import time_interleaved

GRAPH_CALLS = 20


def _patched(module, name: str, value, fn):
    """``fn`` with ``module.name`` set to ``value`` for the duration of each call."""

    def run():
        old = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn()
        finally:
            setattr(module, name, old)

    return run


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def splitk(repeat: int) -> list[dict]:
    from ryzen_opt.kernels.triton import matmul as tm

    dt = torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    print("m n k split | eager us: cublas one two | graph us/call: cublas one two")
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        w = torch.randn(n, k, device="cuda", dtype=dt)
        for m in (1, 8, 16, 32, 48, 64):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            call = partial(tm.matmul, x, w.t())
            fns = {
                "cublas": partial(torch.matmul, x, w.t()),
                "one": _patched(tm, "_split_k_one_pass", lambda device: True, call),
                "two": _patched(tm, "_split_k_one_pass", lambda device: False, call),
            }
            ref = x.float() @ w.float().t()
            errs = {f: _rel(fns[f](), ref) for f in ("one", "two")}
            eager = time_interleaved(fns, repeat=repeat, warmup=3, device="cuda")
            graphs = {f: cuda_graphed(fn, GRAPH_CALLS) for f, fn in fns.items()}
            graph = time_interleaved(graphs, repeat=repeat, warmup=3, device="cuda")
            r = {
                "m": m, "n": n, "k": k, "split": tm._split_k(m, n, k, 1, sms),
                "eager_us": {f: t.median * 1e6 for f, t in eager.items()},
                "graph_us_per_call": {f: t.median * 1e6 / GRAPH_CALLS for f, t in graph.items()},
                "rel_err_vs_fp32": errs,
            }  # fmt: skip
            rows.append(r)
            e, g = r["eager_us"], r["graph_us_per_call"]
            print(
                f"{m} {n} {k} {r['split']} | {e['cublas']:.1f} {e['one']:.1f} {e['two']:.1f} | "
                f"{g['cublas']:.2f} {g['one']:.2f} {g['two']:.2f}",
                flush=True,
            )
    return rows


def attention_scale(repeat: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ryzen_opt.kernels.triton import attention as ta

    dt = torch.bfloat16
    rows = []
    print("d seq batch causal | ms: cudnn fold first | fold/first")
    for d in (64, 128):
        heads = 2048 // d
        for seq in (1024, 4096, 16384):
            batch = max(1, 16384 // seq)
            q = torch.randn(batch, heads, seq, d, device="cuda", dtype=dt)
            k, v = torch.randn_like(q), torch.randn_like(q)
            for causal in (False, True):

                def cudnn(q=q, k=k, v=v, c=causal):
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=c)

                call = partial(ta.attention, q, k, v, causal)
                fns = {
                    "cudnn": cudnn,
                    "fold": _patched(ta, "_FOLD_SCALE", True, call),
                    "first": _patched(ta, "_FOLD_SCALE", False, call),
                }
                ref = cudnn()
                errs = {f: _rel(fns[f](), ref) for f in ("fold", "first")}
                t = time_interleaved(fns, repeat=repeat, warmup=2, device="cuda")
                ms = {f: x.median * 1e3 for f, x in t.items()}
                flops = 4 * batch * heads * seq * seq * d * (0.5 if causal else 1.0)
                r = {
                    "d": d, "seq": seq, "batch": batch, "heads": heads, "causal": causal,
                    "ms": ms, "rel_err_vs_cudnn": errs,
                    "fold_vs_cudnn": ms["cudnn"] / ms["fold"],
                    "first_vs_cudnn": ms["cudnn"] / ms["first"],
                    "TFLOPs": {f: flops / x / 1e9 for f, x in ms.items()},
                }  # fmt: skip
                rows.append(r)
                print(
                    f"{d} {seq} {batch} {causal} | {ms['cudnn']:.3f} {ms['fold']:.3f} "
                    f"{ms['first']:.3f} | {ms['first'] / ms['fold']:.3f}",
                    flush=True,
                )
    return rows


def _patched_all(module, values: dict, fn):
    """``fn`` with every ``module.<name>`` of ``values`` set for the duration of each call."""
    for name, value in values.items():
        fn = _patched(module, name, value, fn)
    return fn


# (batch, query heads, KV heads, tokens, head dim, causal) of the backward A/B timings
BWD_CASES = (
    (2, 32, 4, 2048, 64, True),  # bench.train_kernels' attention case
    (1, 32, 8, 4096, 128, True),
    (4, 32, 8, 1024, 128, True),
    (1, 32, 4, 4096, 64, False),
)


def _attention_bwd_rows(repeat: int, variants, summary) -> list[dict]:
    """The training attention's forward + backward under each variant, SDPA alongside:
    ``variants(groups, head_dim)`` gives ``{name: {attention_op attribute: value}}``, patched
    for each call; ``summary(row, groups, sms)`` adds a case's derived figures to its row."""
    from bench.train_kernels import _fwd_bwd
    from ryzen_opt.kernels.triton.training import attention_op

    dt = torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for b, hq, hkv, seq, d, causal in BWD_CASES:
        leaves = [
            torch.randn(b, h, seq, d, device="cuda", dtype=dt, requires_grad=True)
            for h in (hq, hkv, hkv)
        ]
        grads = [torch.randn(b, hq, seq, d, device="cuda", dtype=dt)]

        def sdpa(q, k, v, c=causal):
            return (F.scaled_dot_product_attention(q, k, v, is_causal=c, enable_gqa=True),)

        def ours(q, k, v, c=causal):
            return (attention_op.attention(q, k, v, causal=c),)

        call = _fwd_bwd(ours, leaves, grads)
        groups = hq // hkv
        fns = {"sdpa": _fwd_bwd(sdpa, leaves, grads)}
        for name, values in variants(groups, d).items():
            fns[name] = _patched_all(attention_op, values, call)
        ref = torch.autograd.grad(sdpa(*leaves), leaves, grads)
        errs = {
            f: max(_rel(g, r) for g, r in zip(fn(), ref, strict=True))
            for f, fn in fns.items()
            if f != "sdpa"
        }
        eager = time_interleaved(fns, repeat=repeat, warmup=2, device="cuda")
        graphs = {f: cuda_graphed(fn) for f, fn in fns.items()}
        graph = time_interleaved(graphs, repeat=repeat, warmup=2, device="cuda")
        r = {
            "b": b, "hq": hq, "hkv": hkv, "seq": seq, "d": d, "causal": causal,
            "rel_err_vs_sdpa": errs,
            "eager_ms": {f: t.median * 1e3 for f, t in eager.items()},
            "graph_ms": {f: t.median * 1e3 for f, t in graph.items()},
        }  # fmt: skip
        summary(r, groups, sms)
        rows.append(r)
        print(
            f"{b} {hq} {hkv} {seq} {d} {causal} | "
            + " ".join(f"{f}={t:.3f}" for f, t in r["eager_ms"].items())
            + " | "
            + " ".join(f"{f}={t:.3f}" for f, t in r["graph_ms"].items()),
            flush=True,
        )
        del graphs
    return rows


def attention_bwd_split(repeat: int) -> list[dict]:
    from ryzen_opt.kernels.triton.training import attention_op

    def variants(groups, d):
        return {f"s{n}": {"_DKDV_SHARES": n} for n in range(1, groups + 1) if groups % n == 0}

    def summary(r, groups, sms):
        tiles = -(-r["seq"] // attention_op._bwd_blocks(r["d"])[0][1])
        auto = attention_op._dkdv_split(
            tiles * r["b"] * r["hkv"], groups, sms, r["causal"], r["seq"] * groups
        )
        r["auto"] = f"s{auto}"
        r["graph_auto_vs_s1"] = r["graph_ms"]["s1"] / r["graph_ms"][r["auto"]]
        r["graph_auto_vs_sdpa"] = r["graph_ms"]["sdpa"] / r["graph_ms"][r["auto"]]

    print("b hq hkv seq d causal | eager ms: sdpa s1 s2 ... | graph ms: sdpa s1 s2 ...")
    return _attention_bwd_rows(repeat, variants, summary)


# Backward tiles tried beside the library's: name -> (the dK/dV kernel's, the dQ kernel's)
# (BLOCK_M, BLOCK_N, warps, stages), None for the library's choice of that kernel.
BWD_TILES = {
    "before": ((64, 64, 4, 2), (64, 64, 4, 2)),  # with every tile masked: the kernels of old
    "s3": ((64, 64, 4, 3), (64, 64, 4, 3)),
    "dq128x64w8": (None, (128, 64, 8, 2)),
    "dq128x32s3": (None, (128, 32, 4, 3)),
    "dq64x32s3": (None, (64, 32, 4, 3)),
}


def attention_bwd(repeat: int) -> list[dict]:
    """The library's backward (``split``: its whole tiles run without masks) against the
    kernels of old (``before``: every tile masked, 64 x 64 tiles, two stages) and other
    tiles (:data:`BWD_TILES`)."""
    from ryzen_opt.kernels.triton.training import attention_op

    def variants(groups, d):
        lib = attention_op._bwd_blocks(d)
        out = {"split": {}}
        for name, tiles in BWD_TILES.items():
            pair = tuple(t if t is not None else lib[i] for i, t in enumerate(tiles))
            out[name] = {"_SPLIT_MASKS": name != "before", "_BWD_TILES": pair}
        return out

    def summary(r, groups, sms):
        g = r["graph_ms"]
        r["graph_split_vs_before"] = g["before"] / g["split"]
        r["graph_vs_sdpa"] = {f: g["sdpa"] / t for f, t in g.items() if f != "sdpa"}

    print("b hq hkv seq d causal | eager ms: sdpa split tiles... | graph ms: same")
    return _attention_bwd_rows(repeat, variants, summary)


# name: (function, JSON file, default rounds); the short split-K calls are noisier.
RUNS = {
    "splitk": (splitk, "splitk_one_vs_two_pass.json", 30),
    "attention-scale": (attention_scale, "attention_fold_scale.json", 12),
    "attention-bwd-split": (attention_bwd_split, "attention_bwd_split.json", 12),
    "attention-bwd": (attention_bwd, "attention_bwd.json", 12),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.triton_ab", description=__doc__)
    ap.add_argument("what", choices=sorted(RUNS))
    ap.add_argument("--repeat", type=int, default=None, help="rounds (30 splitk, 12 attention)")
    ap.add_argument("--out", default=".", help="folder for the JSON")
    a = ap.parse_args(argv)
    fn, name, default_repeat = RUNS[a.what]
    repeat = default_repeat if a.repeat is None else a.repeat
    if repeat < 3:
        ap.error(f"argument --repeat: must be >= 3, got {a.repeat}")
    if not torch.cuda.is_available():
        print("bench.triton_ab needs a CUDA GPU (it times Triton kernels)", file=sys.stderr)
        return 2
    rows = fn(repeat)
    out = Path(a.out) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment("cuda"), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
