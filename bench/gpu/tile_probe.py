"""Tile sweeps for the two matmul goals still open on Hopper (GPU only, a probe).

    python bench/gpu/tile_probe.py skinny   # M = 64, 32 (TILE_PROBE_M=16,1: others): split-K tiles
                                            # (TILE_PROBE_NK=11008x4096,...: the W shapes)
    python bench/gpu/tile_probe.py square   # 4096^3: the TMA kernel's tile, group, stages
    python bench/gpu/tile_probe.py fused    # matmul + bias + GELU: two programs an SM, or
                                            # Triton's warp specialization

``skinny``: decode-time projections (``x @ W.t()``, bf16, W of 4096 x 4096, 11008 x 4096 and
4096 x 11008) at M = 32 and 64, where ``bench.triton_kernels`` has the library at 0.73-0.89x
of cuBLAS. Every split-K config (``BLOCK_N`` 64-256, ``BLOCK_K`` 64/128, 3-4 stages) at 2, 4
and 8 splits in the two-pass form that CUDA-graph capture uses, and the pointer kernel without
split (one fixed config each), timed as CUDA-graph replays of 20 calls (GPU time, no host
launch cost), beside cuBLAS and the library's own choice, in interleaved rounds per shape.
With M = 64 a 64 x 64 tile reads as many bytes of A as of B, so wider tiles might pay.

``square``: the persistent TMA kernel at 4096^3 (0.970x cuBLAS in
``triton_kernels-matmul-tma.log``) launched with one config each: 128x256 and 256x128 tiles,
GROUP_M 4-16, 3-4 stages, on the bench's contiguous B and on ``W.t()``.

Every variant is checked against the fp32 product first. Writes ``tile_probe-<mode>.json``
under ``$OUT``.
"""

import json
import os
import sys
import time
import traceback

import torch
import triton

from bench.common import cuda_graphed, environment
from ryzen_opt.kernels.triton import _common
from ryzen_opt.kernels.triton import matmul as tm
from ryzen_opt.timing import time_interleaved

# fmt: off
# Kernel launches keep their arguments grouped by role, as STYLE.md asks.

OUT = os.environ.get("OUT", ".")
GRAPH_CALLS = 20
# Stop adding variants past this many seconds (one device call is at most 10 minutes).
BUDGET_S = float(os.environ.get("TILE_PROBE_BUDGET_S", "330"))


def _splitk(x, wt, split, cfg):
    """The library's split-K kernel, two passes (as under graph capture), one fixed config."""
    m, k = x.shape
    n = wt.shape[1]
    c = torch.empty(m, n, device=x.device, dtype=x.dtype)
    ws = torch.empty(split * m * n, device=x.device, dtype=torch.float32)
    cnt = torch.empty(1, device=x.device, dtype=torch.int32)
    keys = (_common.pow2_bucket(m), _common.pow2_bucket(n), _common.pow2_bucket(k))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split, 1)
    tm._matmul_splitk_kernel.fn[grid](
        x, wt, ws, cnt, c, c, c, m, n, k, *keys,
        0, x.stride(0), x.stride(1), 0, wt.stride(0), wt.stride(1), m * n, m * n,
        0, c.stride(0), c.stride(1), 0, 0, 0, 0,
        SPLIT_K=split, INPUT_PRECISION=_common.dot_precision(x.dtype),
        UPCAST=_common.upcast_dot(x.dtype), HAS_BIAS=False, ACTIVATION=0, HAS_RESIDUAL=False,
        ONE_PASS=False, GROUP_M=1, PERSISTENT=False, **cfg)
    rbm = min(16, _common.next_pow2(m))
    tm._splitk_reduce_kernel[(triton.cdiv(m, rbm), triton.cdiv(n, 64), 1)](
        ws, c, c, c, m, n, m * n, m * n, 0, c.stride(0), c.stride(1), 0, 0, 0, 0,
        SPLIT_K=split, HAS_BIAS=False, ACTIVATION=0, HAS_RESIDUAL=False,
        BLOCK_M=rbm, BLOCK_N=64, num_warps=4)
    return c


def _tma(a, b, cfg, b_kn, bias=None, act=None, per_sm=1):
    """The library's TMA kernel with one config; ``per_sm`` programs an SM (the tile stride)."""
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty(m, n, device=a.device, dtype=a.dtype)
    sms = _common.num_sms(a.device.index or 0)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    programs = min(per_sm * sms, tiles)
    keys = (_common.pow2_bucket(m), _common.pow2_bucket(n), _common.pow2_bucket(k))
    tm._ensure_tma_allocator()
    cfg = {"FLATTEN": True, "PER_SM": per_sm, **cfg}
    tm._matmul_tma_kernel.fn[(programs,)](
        a, b, c, c if bias is None else bias, c, m, n, k, *keys,
        a.stride(0), b.stride(0) if b_kn else b.stride(1), c.stride(0), 1, 0, 0,
        HAS_BIAS=bias is not None, ACTIVATION=tm._ACTIVATION_CODE[act], HAS_RESIDUAL=False,
        B_KN=b_kn, UPCAST=_common.upcast_dot(a.dtype), **cfg)
    return c


def _skinny_variants(m):
    bm = max(16, _common.next_pow2(m))
    out = []
    for bn in (64, 128, 256):
        for bk in (64, 128):
            for stages in (3, 4):
                for warps in ((4, 8) if bn == 256 else (4,)):
                    if (bm * bk + bk * bn) * 2 * stages > 200 * 1024:
                        continue
                    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                           "num_warps": warps, "num_stages": stages}
                    for split in (1, 2, 4, 8):
                        out.append((split, cfg))
    return out


def _name(split, cfg):
    return (f"{'split' + str(split) if split > 1 else 'nosplit'} "
            f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} s{cfg['num_stages']} "
            f"w{cfg['num_warps']}")


def _check(fn, ref):
    out = fn()
    return float((out.float() - ref).norm() / ref.norm())


def try_variant(fns, errors, name, fn, ref, log=True):
    """Check ``fn`` against ``ref`` and keep it in ``fns`` for timing; a config that does not
    compile is a result too: its error goes into ``errors`` in place of the deviation."""
    try:
        errors[name] = _check(fn, ref)
    except Exception:  # noqa: BLE001
        errors[name] = "failed: " + traceback.format_exc(limit=1).splitlines()[-1]
        if log:
            print(name, errors[name][:200], flush=True)
        return
    fns[name] = fn


def drop_wrong(fns, errors, tol=1e-2):
    """Drop from ``fns`` the variants whose result is off by more than ``tol``; their names."""
    bad = [nm for nm, e in errors.items() if isinstance(e, float) and e > tol]
    for nm in bad:
        fns.pop(nm, None)
    return bad


def skinny(t0):
    rows = []
    dt = torch.bfloat16
    sms = _common.num_sms(0)
    for m in [int(v) for v in os.environ.get("TILE_PROBE_M", "64,32").split(",")]:
        shapes = os.environ.get("TILE_PROBE_NK", "4096x4096,11008x4096,4096x11008")
        for n, k in [tuple(int(v) for v in nk.split("x")) for nk in shapes.split(",")]:
            if time.time() - t0 > BUDGET_S:
                print("budget spent: skipping", m, n, k, flush=True)
                continue
            torch.manual_seed(0)
            w = torch.randn(n, k, device="cuda", dtype=dt) * 0.02
            x = torch.randn(m, k, device="cuda", dtype=dt)
            wt = w.t()
            ref = x.float() @ wt.float()
            fns = {"cublas": lambda x=x, wt=wt: x @ wt,
                   "library": lambda x=x, wt=wt: tm.matmul(x, wt)}
            errors = {name: _check(fn, ref) for name, fn in fns.items()}
            for split, cfg in _skinny_variants(m):
                if split > 1 and k // split < cfg["BLOCK_K"] * 2:
                    continue
                name = _name(split, cfg)
                if split == 1:
                    fixed = {**cfg, "GROUP_M": 8, "PERSISTENT": False}

                    def fn(x=x, wt=wt, fixed=fixed):
                        return tm._launch(x, wt, None, None, None, None, config=fixed)
                else:
                    def fn(x=x, wt=wt, split=split, cfg=cfg):
                        return _splitk(x, wt, split, cfg)
                try_variant(fns, errors, name, fn, ref, log=False)
            bad = drop_wrong(fns, errors)
            graphs = {nm: cuda_graphed(fn, GRAPH_CALLS) for nm, fn in fns.items()}
            times = time_interleaved(graphs, repeat=int(os.environ.get("TILE_PROBE_REPEAT", "7")),
                                     warmup=2, device="cuda")
            base = times["cublas"].median
            print(f"== M={m} N={n} K={k} (library split {tm._split_k(m, n, k, 1, sms)}, "
                  f"wrong: {bad})", flush=True)
            ranked = sorted(times.items(), key=lambda kv: kv[1].median)
            for rank, (nm, t) in enumerate(ranked):
                us = t.median / GRAPH_CALLS * 1e6
                rows.append({"shape_mnk": [m, n, k], "case": nm, "us": us,
                             "x_cublas": base / t.median, "rel_error": errors[nm]})
                if rank < 12 or nm in ("cublas", "library"):
                    print(f"  {nm:<34} {us:8.2f} us  x{base / t.median:5.3f} cuBLAS", flush=True)
            for nm, e in errors.items():
                if isinstance(e, str):
                    rows.append({"shape_mnk": [m, n, k], "case": nm, "failed": e})
    return rows


def square(t0):
    rows = []
    dt = torch.bfloat16
    n = 4096
    torch.manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=dt)
    b = torch.randn(n, n, device="cuda", dtype=dt)
    w = b.t().contiguous()  # W.t() == b, K contiguous
    ref = a.float() @ b.float()
    fns = {"cublas": lambda: a @ b, "cublas W.t()": lambda: a @ w.t(),
           "library": lambda: tm.matmul(a, b), "library W.t()": lambda: tm.matmul(a, w.t())}
    errors = {nm: _check(fn, ref) for nm, fn in fns.items()}
    cfgs = []
    for bm, bn, warps, split in ((128, 256, 8, 2), (256, 128, 8, 1), (128, 128, 4, 1),
                                 (128, 128, 8, 1)):
        for group in (4, 8, 16):
            for stages in (3, 4):
                if (bm * 64 + 64 * bn) * 2 * stages + bm * bn * 2 // split > 225 * 1024:
                    continue
                cfgs.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": group,
                             "EPI_SPLIT": split, "num_warps": warps, "num_stages": stages})
    for cfg in cfgs:
        for b_kn in (True, False):
            if time.time() - t0 > BUDGET_S:
                break
            nm = (f"tma {cfg['BLOCK_M']}x{cfg['BLOCK_N']} g{cfg['GROUP_M']} "
                  f"s{cfg['num_stages']} w{cfg['num_warps']} {'B' if b_kn else 'W.t()'}")

            def fn(cfg=cfg, b_kn=b_kn):
                return _tma(a, b if b_kn else w.t(), cfg, b_kn)
            try_variant(fns, errors, nm, fn, ref)
    bad = drop_wrong(fns, errors)
    times = time_interleaved(fns, repeat=9, warmup=2, device="cuda")
    base = times["cublas"].median
    print(f"== 4096^3 (wrong: {bad}; library: {tm._matmul_tma_kernel.best_config})", flush=True)
    for nm, t in sorted(times.items(), key=lambda kv: kv[1].median):
        rows.append({"case": nm, "ms": t.median * 1e3, "x_cublas": base / t.median,
                     "TFLOPs": 2 * n**3 / t.median / 1e12, "rel_error": errors[nm]})
        print(f"  {nm:<34} {t.median * 1e3:7.4f} ms {2 * n**3 / t.median / 1e12:5.0f} TFLOP/s "
              f"x{base / t.median:5.3f} cuBLAS", flush=True)
    return rows


def _fused_variants():
    """(name, config, programs an SM): two programs an SM (small tiles, 2-3 stages: one
    program's epilogue beside the other's main loop, the warp scheduler's ping-pong), and
    Triton's warp specialization of the tile loop, against the library's configs."""
    out = []
    for bn, stages, flat, split in ((128, 2, False, 1), (128, 2, False, 2), (128, 2, True, 2),
                                    (128, 3, False, 2), (64, 3, False, 1), (64, 4, False, 1)):
        out.append((f"2/SM 128x{bn} s{stages} w4 flat{int(flat)} epi{split}",
                    {"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8,
                     "FLATTEN": flat, "EPI_SPLIT": split, "num_warps": 4,
                     "num_stages": stages}, 2))
    for bn, stages, warps, split in ((256, 3, 8, 2), (128, 4, 4, 1), (128, 4, 8, 1)):
        out.append((f"ws 128x{bn} s{stages} w{warps} epi{split}",
                    {"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8,
                     "FLATTEN": True, "EPI_SPLIT": split, "WARP_SPEC": True,
                     "num_warps": warps, "num_stages": stages}, 1))
    out.append(("1/SM 128x256 s3 w8 flat1 epi2 (library's best)",
                {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "FLATTEN": True,
                 "EPI_SPLIT": 2, "num_warps": 8, "num_stages": 3}, 1))
    return out


def fused(t0):
    import torch.nn.functional as F

    rows = []
    dt = torch.bfloat16
    for m, n, k in ((8192, 16384, 4096), (8192, 8192, 1024)):
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda", dtype=dt)
        w = torch.randn(n, k, device="cuda", dtype=dt) * 0.02
        bias = torch.randn(n, device="cuda", dtype=dt)
        wt = w.t()
        ref = F.gelu(torch.addmm(bias.float(), x.float(), wt.float()))
        ref_plain = x.float() @ wt.float()
        fns, errors = {}, {}
        for nm, fn, r in (
            ("cublas gelu(addmm)", lambda x=x, wt=wt, bias=bias: F.gelu(torch.addmm(bias, x, wt)),
             ref),
            ("cublas mm", lambda x=x, wt=wt: x @ wt, ref_plain),
            ("library gelu",
             lambda x=x, wt=wt, bias=bias: tm.matmul(x, wt, bias=bias, activation="gelu"), ref),
            ("library plain", lambda x=x, wt=wt: tm.matmul(x, wt), ref_plain),
        ):
            try_variant(fns, errors, nm, fn, r)
        for name, cfg, per_sm in _fused_variants():
            if time.time() - t0 > BUDGET_S:
                break
            for act in ("gelu", None):
                def fn(cfg=cfg, per_sm=per_sm, act=act, x=x, wt=wt, bias=bias):
                    return _tma(x, wt, cfg, False, bias if act else None, act, per_sm)
                try_variant(fns, errors, f"{name} {act or 'plain'}", fn,
                            ref if act else ref_plain)
        bad = drop_wrong(fns, errors)
        times = time_interleaved(fns, repeat=7, warmup=2, device="cuda")
        base = times["cublas gelu(addmm)"].median
        plain = times["cublas mm"].median
        print(f"== [{m}, {n}, {k}] W.t() (wrong: {bad})", flush=True)
        for nm, t in sorted(times.items(), key=lambda kv: kv[1].median):
            ref_t = base if "gelu" in nm else plain
            rows.append({"shape_mnk": [m, n, k], "case": nm, "ms": t.median * 1e3,
                         "x_cublas_same_op": ref_t / t.median, "rel_error": errors[nm]})
            print(f"  {nm:<52} {t.median * 1e3:7.3f} ms  x{ref_t / t.median:5.3f} of cuBLAS "
                  f"{'gelu(addmm)' if 'gelu' in nm else 'mm'}", flush=True)
        for nm, e in errors.items():
            if isinstance(e, str):
                rows.append({"shape_mnk": [m, n, k], "case": nm, "failed": e})
    return rows


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "skinny"
    t0 = time.time()
    rows = {"skinny": skinny, "square": square, "fused": fused}[mode](t0)
    doc = {"command": f"python bench/gpu/tile_probe.py {mode}", "graph_calls": GRAPH_CALLS,
           "environment": environment("cuda"), "rows": rows}
    with open(os.path.join(OUT, f"tile_probe-{mode}.json"), "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
