"""Triton kernels vs the PyTorch baselines on one GPU, side by side, next to measured ceilings.

Run from the repository root on a CUDA machine:

    PYTHONPATH=. python3 -m bench.triton_kernels --out results.json [--only matmul,attention]

Every comparison times baseline and candidate interleaved (ABBA, ``ryzen_opt.timing.compare``)
on the same random inputs after warm-up (compilation and autotuning happen there). Ceilings
measured in the same process: cuBLAS bf16 GEMM at 4096 and 8192, and a device-to-device copy
(bytes read + written).

The candidate is the Triton kernel unless a row names another ``backend`` (the CUTLASS
matmul on sm_90, cuBLASLt's fused GELU epilogue as a peer); ``triton_s`` / ``triton_TFLOPs``
then hold that candidate's figures. Where a case has several candidates (Triton, CUTLASS,
cuBLASLt's epilogue), all of them and the baseline are timed in one interleaved run
(``ryzen_opt.timing.time_interleaved``), so every row of the case divides the same baseline
samples (``timed_with`` names the columns of that run): timed in separate runs, cuDNN's
attention read up to 1.2x apart between two rows of one case.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from bench.common import cuda_graphed
from ryzen_opt.cpu_info import cpu_isa
from ryzen_opt.kernels import reference
from ryzen_opt.timing import bootstrap_ratio_ci, compare, time_fn, time_interleaved

REPEAT = 10


def _env() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpu_isa": cpu_isa(),
        "command": " ".join(["python3", "-m", "bench.triton_kernels", *sys.argv[1:]]),
        "timing": f"ryzen_opt.timing.compare (ABBA) or time_interleaved (several candidates of "
        f"one case), repeat={REPEAT}, median seconds per call",
    }


def _cmp(base, cand) -> dict:
    c = compare(base, cand, repeat=REPEAT, warmup=3, device="cuda")
    return {
        "baseline_s": c.baseline.median,
        "triton_s": c.candidate.median,
        "speedup": c.speedup,
        "ci": [c.ci_low, c.ci_high],
    }


def _cmp_all(base, cands: dict, device: str = "cuda", repeat: int = REPEAT) -> dict[str, dict]:
    """Each candidate of ``cands`` (name -> callable) against ``base``, all timed in one
    interleaved run (every column leads and follows every other equally often): one dict as
    :func:`_cmp`'s per candidate, each dividing the same baseline samples."""
    if "baseline" in cands:
        raise ValueError("cands must not use the name 'baseline'")
    t = time_interleaved({"baseline": base, **cands}, repeat=repeat, warmup=3, device=device)
    b = t["baseline"]
    out = {}
    for name in cands:
        c = t[name]
        out[name] = {
            "baseline_s": b.median,
            "triton_s": c.median,
            "speedup": b.median / c.median,
            "ci": list(bootstrap_ratio_ci(b.samples, c.samples)),
            "timed_with": list(t),
        }
    return out


GRAPH_CALLS = 20


def _graphed(fn):
    """A callable replaying GRAPH_CALLS calls of ``fn`` captured in one CUDA graph.

    Takes Python and Triton launch time out (Triton 3.6 spends ~100 us of host time per launch
    of a 30-argument kernel): what remains is GPU time, as under torch.compile's
    ``mode="reduce-overhead"`` or any graph-captured decode loop.
    """
    return cuda_graphed(fn, GRAPH_CALLS)


def _cmp_graphed(base, cand) -> dict:
    r = _cmp(_graphed(base), _graphed(cand))
    r["baseline_s"] /= GRAPH_CALLS
    r["triton_s"] /= GRAPH_CALLS
    return r


def _err(out, ref) -> float:
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm())


def ceilings() -> dict:
    out = {}
    x = torch.randn(256 * 1024 * 1024, device="cuda")  # 1 GiB, 20x the L2
    y = torch.empty_like(x)
    t = time_fn(partial(y.copy_, x), repeat=REPEAT, device="cuda").median
    out["copy_GBps"] = 2 * x.numel() * 4 / t / 1e9
    for n in (4096, 8192):
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        t = time_fn(lambda a=a, b=b: a @ b, repeat=REPEAT, device="cuda").median
        out[f"cublas_bf16_{n}_TFLOPs"] = 2 * n**3 / t / 1e12
    return out


def _addmm_gelu(bias, x, wt, approx):
    return F.gelu(torch.addmm(bias, x, wt), approximate=approx)


def _matmul_config(tm, a, b, **kw) -> str:
    """Which kernel the library runs for this call (the TMA or the pointer kernel) and its
    autotuned config; launched through ``_launch`` so that no eager plan hides the choice."""
    before = tm._launch_tma.hits + tm._launch_tma.misses
    tm._launch(a, b, kw.get("bias"), kw.get("activation"), None, None)
    if tm._launch_tma.hits + tm._launch_tma.misses > before:
        return f"tma: {tm._matmul_tma_kernel.best_config}"
    return f"pointer: {getattr(tm._matmul_kernel, 'best_config', None)}"


def _other_backend(row, backend, timed, cand, ref, flops) -> dict:
    """The row of another candidate on ``row``'s case: ``timed`` is its entry of the case's
    :func:`_cmp_all` (``triton_s`` is then that candidate's time, ``backend`` its name)."""
    r = dict(timed)
    r.update({k: row[k] for k in ("op", "shape", "dtype", "baseline")})
    r.update(
        backend=backend, triton_TFLOPs=flops / r["triton_s"] / 1e12, rel_error=_err(cand(), ref)
    )
    return r


def bench_matmul() -> list[dict]:
    from ryzen_opt.kernels.cutlass import _build
    from ryzen_opt.kernels.cutlass import matmul as cm
    from ryzen_opt.kernels.triton import matmul as tm

    rows = []
    dt = torch.bfloat16
    # The CUTLASS backend (sm_90 ping-pong kernels) beside Triton where it is available.
    cutlass = cm.available()
    if cutlass is not None:
        rows.append({"op": "matmul (cutlass)", "skipped": cutlass})
    else:
        _build.build()  # calls never build: every kernel now (cached after the first run)
    for n in (4096, 8192):
        a = torch.randn(n, n, device="cuda", dtype=dt)
        b = torch.randn(n, n, device="cuda", dtype=dt)
        cands = {"triton": lambda a=a, b=b: tm.matmul(a, b)}
        if cutlass is None:
            cands["cutlass"] = partial(cm.matmul, a, b)
        timed = _cmp_all(lambda a=a, b=b: a @ b, cands)
        r = dict(timed["triton"])
        flops = 2 * n**3
        r.update(
            op="matmul",
            shape=[n, n, n],
            dtype="bf16",
            baseline="cuBLAS (torch.matmul)",
            baseline_TFLOPs=flops / r["baseline_s"] / 1e12,
            triton_TFLOPs=flops / r["triton_s"] / 1e12,
            rel_error=_err(tm.matmul(a, b), ref := a.float() @ b.float()),
            config=_matmul_config(tm, a, b),
        )
        rows.append(r)
        if cutlass is None:
            rows.append(
                _other_backend(r, "cutlass", timed["cutlass"], cands["cutlass"], ref, flops)
            )
        del ref
        # The persistent and the one-tile-per-program variant of the same tile shape, each
        # launched without the autotuner, so the choice between them is on record.
        for persistent in (False, True):
            cfg = {
                "BLOCK_M": 128,
                "BLOCK_N": 256,
                "BLOCK_K": 64,
                "GROUP_M": 8,
                "PERSISTENT": persistent,
                "num_warps": 8,
                "num_stages": 3,
            }
            r = _cmp(
                lambda a=a, b=b: a @ b,
                lambda a=a, b=b, cfg=cfg: tm._launch(a, b, None, None, None, None, cfg),
            )
            r.update(
                op="matmul_variant",
                shape=[n, n, n],
                dtype="bf16",
                baseline="cuBLAS",
                variant=f"128x256x64 persistent={persistent}",
                triton_TFLOPs=flops / r["triton_s"] / 1e12,
            )
            rows.append(r)
    # Fused bias + GELU (an MLP up-projection: 8192 tokens, 4096 -> 16384) vs addmm + gelu.
    fused = [
        (8192, 4096, 16384, "gelu", "none"),
        (8192, 4096, 16384, "gelu_tanh", "tanh"),
        (8192, 1024, 8192, "gelu", "none"),
    ]
    for m, k, n, act, approx in fused:
        x = torch.randn(m, k, device="cuda", dtype=dt)
        wt = (torch.randn(n, k, device="cuda", dtype=dt) * 0.02).t()
        bias = torch.randn(n, device="cuda", dtype=dt)
        ref = F.gelu(torch.addmm(bias.float(), x.float(), wt.float()), approximate=approx)
        base = partial(_addmm_gelu, bias, x, wt, approx)
        cands = {"triton": partial(tm.matmul, x, wt, bias=bias, activation=act)}
        if cutlass is None:
            cands["cutlass"] = partial(cm.matmul, x, wt, bias=bias, activation=act)
        if approx == "tanh":
            # cuBLASLt's own fused epilogue (tanh GELU, the same function): a peer that fuses.
            cands["cuBLASLt epilogue"] = partial(
                torch._addmm_activation, bias, x, wt, use_gelu=True
            )
        timed = _cmp_all(base, cands)
        r = dict(timed["triton"])
        r.update(
            op=f"matmul+bias+{act}",
            shape=[m, n, k],
            dtype="bf16",
            baseline="torch.addmm + F.gelu",
            triton_TFLOPs=2 * m * n * k / r["triton_s"] / 1e12,
            config=_matmul_config(tm, x, wt, bias=bias, activation=act),
            rel_error=_err(tm.matmul(x, wt, bias=bias, activation=act), ref),
        )
        rows.append(r)
        for name in list(cands)[1:]:
            rows.append(_other_backend(r, name, timed[name], cands[name], ref, 2 * m * n * k))
        del ref
    # Skinny M (decode-time projections) against cuBLAS, nn.Linear layout (b = w.t()).
    # (32000 x 4096: an LM head, where M > 8 takes no split.)
    for n, k in ((4096, 4096), (11008, 4096), (32000, 4096)):
        w = torch.randn(n, k, device="cuda", dtype=dt)
        for m in (1, 8, 16, 32, 64):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            base, cand = partial(torch.matmul, x, w.t()), partial(tm.matmul, x, w.t())
            r = _cmp(base, cand)
            g = _cmp_graphed(base, cand)
            nbytes = (m * k + k * n + m * n) * 2
            r["graph"] = {
                **g,
                "baseline_GBps": nbytes / g["baseline_s"] / 1e9,
                "triton_GBps": nbytes / g["triton_s"] / 1e9,
            }
            r.update(
                op="matmul_skinny",
                shape=[m, n, k],
                dtype="bf16",
                baseline="cuBLAS",
                baseline_GBps=nbytes / r["baseline_s"] / 1e9,
                triton_GBps=nbytes / r["triton_s"] / 1e9,
                split_k=tm._split_k(
                    m, n, k, 1, torch.cuda.get_device_properties(0).multi_processor_count
                ),
                rel_error=_err(tm.matmul(x, w.t()), x.float() @ w.float().t()),
            )
            rows.append(r)
    return rows


def _sdpa_best(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    times = {}
    for name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
    ):

        def fn(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        try:
            fn()
            times[name] = (time_fn(fn, repeat=5, device="cuda").median, fn)
        except RuntimeError as e:
            times[name] = (math.inf, str(e).splitlines()[0][:120])
    best = min(times, key=lambda kk: times[kk][0])
    return best, times


def bench_attention() -> list[dict]:
    from ryzen_opt.kernels.cutlass import _build
    from ryzen_opt.kernels.cutlass import attention as ca
    from ryzen_opt.kernels.triton import attention as ta

    rows = []
    dt = torch.bfloat16
    # The CUTLASS backend (sm_90 warp-specialized FMHA) beside Triton where it is available.
    cutlass = ca.available()
    if cutlass is not None:
        rows.append({"op": "attention (cutlass)", "skipped": cutlass})
    else:  # calls never build: the schedules these cases run, now (cached after the first run)
        _build.build_attention(
            [(d, m, ca.variant(d, m == "causal", seq)) for d in (64, 128)
             for m in ("full", "causal") for seq in (1024, 4096, 16384)]
        )  # fmt: skip
    for d in (64, 128):
        heads = 2048 // d  # a 2048-wide model
        for seq in (1024, 4096, 16384):
            batch = max(1, 16384 // seq)  # 16k tokens per call
            q = torch.randn(batch, heads, seq, d, device="cuda", dtype=dt)
            k, v = torch.randn_like(q), torch.randn_like(q)
            for causal in (False, True):
                best, times = _sdpa_best(q, k, v, causal)
                if not callable(times[best][1]):
                    rows.append({"op": "attention", "error": times[best][1]})
                    continue
                cands = {"triton": lambda q=q, k=k, v=v, c=causal: ta.attention(q, k, v, c)}
                if cutlass is None:
                    cands["cutlass"] = partial(ca.attention, q, k, v, causal)
                timed = _cmp_all(times[best][1], cands)
                r = dict(timed["triton"])
                flops = 4 * batch * heads * seq * seq * d * (0.5 if causal else 1.0)
                out = ta.attention(q, k, v, causal)
                ref = times[best][1]()
                r.update(
                    op="attention",
                    shape=[batch, heads, seq, d],
                    causal=causal,
                    dtype="bf16",
                    baseline=f"SDPA {best}",
                    sdpa_backend_s={kk: vv[0] for kk, vv in times.items()},
                    baseline_TFLOPs=flops / r["baseline_s"] / 1e12,
                    triton_TFLOPs=flops / r["triton_s"] / 1e12,
                    rel_error_vs_sdpa=_err(out, ref),
                    config=str(ta._attn_fwd_kernel.best_config),
                )
                rows.append(r)
                if cutlass is None:
                    c = _other_backend(r, "cutlass", timed["cutlass"], cands["cutlass"], ref, flops)
                    c.update(causal=causal, baseline_TFLOPs=flops / c["baseline_s"] / 1e12,
                             variant=ca.variant(d, causal, seq))  # fmt: skip
                    rows.append(c)
    return rows


def _decode_err(td, q, kc, vc, lens) -> float:
    # Two rows in fp32 are enough to check, and keep the reference inside GPU memory.
    out = td.decode_attention(q[:2], kc[:2], vc[:2], lens[:2])
    return _err(
        out, reference.decode_attention(q[:2].float(), kc[:2].float(), vc[:2].float(), lens[:2])
    )


def bench_decode(copy_gbps: float) -> list[dict]:
    from ryzen_opt.kernels.triton import decode_attention as td

    rows = []
    dt = torch.bfloat16
    hq, hkv, d = 32, 8, 128
    for batch, max_len in ((8, 4096), (8, 32768), (32, 8192), (64, 4096), (64, 32768)):
        q = torch.randn(batch, hq, d, device="cuda", dtype=dt)
        kc = torch.randn(batch, hkv, max_len, d, device="cuda", dtype=dt)
        vc = torch.randn_like(kc)
        lens = torch.full((batch,), max_len, device="cuda", dtype=torch.int32)
        nbytes = 2 * kc.numel() * 2
        args = (q, kc, vc, lens)
        try:
            r = _cmp(
                partial(reference.decode_attention, *args), partial(td.decode_attention, *args)
            )
        except torch.OutOfMemoryError:  # the reference expands kv heads 4x and masks scores
            torch.cuda.empty_cache()
            t = time_fn(partial(td.decode_attention, *args), repeat=REPEAT, device="cuda")
            r = {
                "baseline_s": math.nan,
                "triton_s": t.median,
                "speedup": math.nan,
                "baseline_error": "reference.decode_attention ran out of GPU memory",
            }
        # The launcher validates cache_lengths (one host sync, reference.check_decode_args);
        # _launch alone is the kernel pair.
        t_op = time_fn(partial(td._launch, *args, None), repeat=REPEAT, device="cuda").median
        t_graph = (
            time_fn(_graphed(partial(td._launch, *args, None)), repeat=REPEAT, device="cuda").median
            / GRAPH_CALLS
        )
        r["graph"] = {
            "triton_s": t_graph,
            "triton_GBps": nbytes / t_graph / 1e9,
            "fraction_of_copy": nbytes / t_graph / 1e9 / copy_gbps,
        }
        r.update(
            op="decode_attention",
            shape=[batch, hq, hkv, max_len, d],
            dtype="bf16",
            baseline="reference.decode_attention (SDPA + mask)",
            baseline_GBps=nbytes / r["baseline_s"] / 1e9,
            triton_GBps=nbytes / r["triton_s"] / 1e9,
            op_only_s=t_op,
            op_only_GBps=nbytes / t_op / 1e9,
            op_only_fraction_of_copy=nbytes / t_op / 1e9 / copy_gbps,
            fraction_of_copy=nbytes / r["triton_s"] / 1e9 / copy_gbps,
            rel_error_2_rows=_decode_err(td, *args),
        )
        rows.append(r)
        del q, kc, vc, args
        torch.cuda.empty_cache()
    return rows


def bench_layer_norm(copy_gbps: float) -> list[dict]:
    from ryzen_opt.kernels.triton import layer_norm as tln

    rows = []
    dt = torch.bfloat16
    for m, n in ((8192, 4096), (16384, 768)):
        x = torch.randn(m, n, device="cuda", dtype=dt)
        r_ = torch.randn_like(x)
        w, b = torch.randn(n, device="cuda", dtype=dt), torch.randn(n, device="cuda", dtype=dt)
        r = _cmp(
            partial(reference.layer_norm, x, w, b, residual=r_),
            partial(tln.layer_norm, x, w, b, residual=r_),
        )
        nbytes = 4 * x.numel() * 2  # read x, residual; write out, h
        g = _cmp_graphed(
            partial(reference.layer_norm, x, w, b, residual=r_),
            partial(tln.layer_norm, x, w, b, residual=r_),
        )
        r["graph"] = {
            **g,
            "triton_GBps": nbytes / g["triton_s"] / 1e9,
            "fraction_of_copy": nbytes / g["triton_s"] / 1e9 / copy_gbps,
        }
        r.update(
            op="layer_norm+residual",
            shape=[m, n],
            dtype="bf16",
            baseline="x + r, F.layer_norm",
            triton_GBps=nbytes / r["triton_s"] / 1e9,
            fraction_of_copy=nbytes / r["triton_s"] / 1e9 / copy_gbps,
        )
        rows.append(r)
    return rows


def _table(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(r["op"], "ERROR", r["error"])
            continue
        if "skipped" in r:
            print(r["op"], "not run:", r["skipped"])
            continue
        extra = ""
        for key in (
            "baseline_TFLOPs",
            "triton_TFLOPs",
            "baseline_GBps",
            "triton_GBps",
            "op_only_GBps",
            "fraction_of_copy",
            "op_only_fraction_of_copy",
        ):
            if key in r:
                extra += f" {key}={r[key]:.3g}"
        if "graph" in r:
            g = r["graph"]
            extra += f" | graph: triton={g['triton_s'] * 1e3:.4f}ms"
            if "speedup" in g:
                extra += f" base={g['baseline_s'] * 1e3:.4f}ms x{g['speedup']:.3f}"
            for key in ("triton_GBps", "fraction_of_copy"):
                extra += f" {key}={g[key]:.3g}" if key in g else ""
        print(
            f"{r['op']:<22} {str(r.get('shape')):<26} c={str(r.get('causal', '')):<5} "
            f"base={r['baseline_s'] * 1e3:8.3f}ms {r.get('backend', 'triton')}="
            f"{r['triton_s'] * 1e3:8.3f}ms "
            f"x{r['speedup']:.3f}{extra} {r.get('variant', '')}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="matmul,attention,decode,layer_norm")
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {"env": _env(), "ceilings": ceilings(), "results": []}
    print(json.dumps(result["env"]), json.dumps(result["ceilings"]), flush=True)
    copy = result["ceilings"]["copy_GBps"]
    steps = {
        "matmul": bench_matmul,
        "attention": bench_attention,
        "decode": lambda: bench_decode(copy),
        "layer_norm": lambda: bench_layer_norm(copy),
    }
    for name in args.only.split(","):
        t0 = time.time()
        try:
            rows = steps[name]()
        except Exception as e:  # record the failure and go on to the next op
            rows = [{"op": name, "error": f"{type(e).__name__}: {e}"}]
        for r in rows:
            r["section_wall_s"] = time.time() - t0
        result["results"].extend(rows)
        _table(rows)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
