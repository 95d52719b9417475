"""Where the fused matmul + bias + GELU loses to ``addmm`` + ``gelu`` (GPU only, a probe).

    python bench/gpu/matmul_probe.py layout   # the library's configs, two layouts, an NT loop
    python bench/gpu/matmul_probe.py tma      # a persistent TMA kernel (descriptors, stores)

``bench.triton_kernels`` times the fused op on the nn.Linear layout (``b = W.t()``, K
contiguous) and the plain matmul on a contiguous ``b`` (N contiguous), so its 0.80x (fused)
and 0.94x (plain) mix two effects: the epilogue and the operand layout. Here, one process,
interleaved rounds, the MLP up-projection 8192 x 4096 -> 16384 (bf16):

* cuBLAS: ``x @ W.t()``, ``addmm(bias, x, W.t())``, ``gelu(addmm(...))``, and ``x @ Wc``
  with ``Wc = W.t().contiguous()``;
* the library kernel, autotuned, on both layouts, plain and with bias + GELU;
* every library config launched fixed on ``W.t()``, plain and with bias + GELU;
* ``layout``: every library config launched fixed on ``W.t()``, and an NT variant of the
  tile loop (B's tile loaded as ``(BLOCK_N, BLOCK_K)`` rows of W and transposed in the
  dot), plain and with bias + GELU;
* ``tma``: a persistent kernel whose operands and output move by TMA (device-side tensor
  descriptors, W read as (N, K) as TMA wants it), with and without ``tl.range(flatten=True)``
  (the epilogue of one tile scheduled beside the next tile's loads) and with the tile
  stored whole or in two column halves, plain and with bias + GELU. The committed log came
  from a copy of that kernel in this file; it has since become the library's
  ``_matmul_tma_kernel``, which this mode now launches.

Every variant is checked against fp32 ``gelu(addmm)`` before timing. Writes
``matmul_probe-<mode>.json`` under ``$OUT``; results in ``bench/results/h200/matmul_probe.*``.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench.common import environment
from bench.gpu import tile_probe
from ryzen_opt.kernels.triton import matmul as tm
from ryzen_opt.timing import time_interleaved

# fmt: off
# Kernel signatures and launches keep their arguments grouped by role, as STYLE.md asks.

OUT = os.environ.get("OUT", ".")


@triton.jit
def _nt_kernel(
    a_ptr, w_ptr, c_ptr, bias_ptr, M, N, K,
    stride_am, stride_wn, stride_cm,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # a (M, K) and w (N, K), both K-contiguous; c = act(a @ w.T + bias), c (M, N) contiguous.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_a = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    rows_w = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + rows_w[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):  # K % BLOCK_K == 0 here (checked by the caller)
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
        acc = tl.dot(a, tl.trans(w), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    tm._epilogue(acc, offs_m, offs_n, M, N, c_ptr, stride_cm, 1, bias_ptr, 1, c_ptr, 0, 0,
                 HAS_BIAS, ACTIVATION, False)


def _nt(x, w, bias, act, cfg):
    m, k = x.shape
    n = w.shape[0]
    assert k % cfg["BLOCK_K"] == 0
    c = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    kw = {k_: v for k_, v in cfg.items() if k_ != "PERSISTENT"}
    _nt_kernel[grid](x, w, c, bias if bias is not None else c, m, n, k,
                     x.stride(0), w.stride(0), c.stride(0),
                     HAS_BIAS=bias is not None, ACTIVATION=tm._ACTIVATION_CODE[act], **kw)
    return c


def _tma(x, b, bias, act, cfg, b_kn=False):
    """The library's TMA kernel with one config; ``b`` is W (N, K) or, with ``b_kn``, (K, N)."""
    return tile_probe._tma(x, b if b_kn else b.t(), cfg, b_kn, bias, act)


def _tma_configs():
    out = []
    for bm, bn, stages, warps in ((128, 256, 3, 8), (128, 256, 4, 8), (128, 128, 4, 8),
                                  (128, 128, 4, 4)):
        for flatten in (False, True):
            for split in ((1, 2) if bn == 256 else (1,)):
                out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8,
                            "num_stages": stages, "num_warps": warps, "FLATTEN": flatten,
                            "EPI_SPLIT": split})
    return out


def _tma_name(cfg, b_kn):
    return (f"tma {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} s{cfg['num_stages']}"
            f" w{cfg['num_warps']} flat{int(cfg['FLATTEN'])} epi{cfg['EPI_SPLIT']}"
            f"{' contiguous' if b_kn else ' W'}")


def _configs():
    out = []
    for cfg in tm._matmul_configs():
        kw = dict(cfg.kwargs)
        if kw["BLOCK_K"] == 32 or kw["BLOCK_M"] < 64:
            continue  # fp32 and skinny configs
        kw["num_warps"], kw["num_stages"] = cfg.num_warps, cfg.num_stages
        out.append(kw)
    return out


def _name(cfg):
    p = " persistent" if cfg.get("PERSISTENT") else ""
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} s{cfg['num_stages']}"
            f" w{cfg['num_warps']}{p}")


def main() -> None:
    torch.manual_seed(0)
    m, k, n = 8192, 4096, 16384
    dt = torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dt)
    w = torch.randn(n, k, device="cuda", dtype=dt) * 0.02
    wt, wc = w.t(), w.t().contiguous()
    bias = torch.randn(n, device="cuda", dtype=dt)
    ref = F.gelu(torch.addmm(bias.float(), x.float(), wt.float()))
    ref_plain = x.float() @ wt.float()

    def err(out, r):
        return float((out.float() - r).norm() / r.norm())

    fns = {
        "cublas mm W.t()": lambda: x @ wt,
        "cublas addmm W.t()": lambda: torch.addmm(bias, x, wt),
        "cublas gelu(addmm) W.t() [baseline]": lambda: F.gelu(torch.addmm(bias, x, wt)),
        "cublas mm contiguous": lambda: x @ wc,
        "lib tuned W.t() plain": lambda: tm.matmul(x, wt),
        "lib tuned W.t() bias+gelu": lambda: tm.matmul(x, wt, bias=bias, activation="gelu"),
        "lib tuned contiguous plain": lambda: tm.matmul(x, wc),
        "lib tuned contiguous bias+gelu": lambda: tm.matmul(x, wc, bias=bias, activation="gelu"),
    }
    ref_bias = ref_plain + bias.float()
    errors = {}
    for name in list(fns):
        r = ref if "gelu" in name else ref_bias if "addmm" in name else ref_plain
        errors[name] = err(fns[name](), r)
    tuned = {}
    for act in (None, "gelu"):
        tm.matmul(x, wt, bias=bias if act else None, activation=act)
        tuned[f"W.t() {act}"] = str(tm._matmul_kernel.best_config)
        tm.matmul(x, wc, bias=bias if act else None, activation=act)
        tuned[f"contiguous {act}"] = str(tm._matmul_kernel.best_config)
    print("autotuned:", tuned, flush=True)
    mode = sys.argv[1] if len(sys.argv) > 1 else "layout"
    if mode == "tma":
        variants = [(cfg, False) for cfg in _tma_configs()]
        variants += [(cfg, True) for cfg in _tma_configs()[:2]]
        for cfg, b_kn in variants:
            for act in (None, "gelu"):
                name = f"{_tma_name(cfg, b_kn)} {act or 'plain'}"

                def tma_fn(cfg=cfg, act=act, b_kn=b_kn):
                    return _tma(x, wc if b_kn else w, bias if act else None, act, cfg, b_kn)

                tile_probe.try_variant(fns, errors, name, tma_fn, ref if act else ref_plain)
    for cfg in _configs() if mode == "layout" else ():
        for act in (None, "gelu"):
            b_ = bias if act else None
            lib = f"lib fixed {_name(cfg)} W.t() {act or 'plain'}"
            nt = f"nt {_name(cfg)} {act or 'plain'}"

            def lib_fn(cfg=cfg, act=act, b_=b_):
                return tm._launch(x, wt, b_, act, None, None, config=cfg)

            def nt_fn(cfg=cfg, act=act, b_=b_):
                return _nt(x, w, b_, act, cfg)

            for name, fn in ((lib, lib_fn), (nt, nt_fn)):
                if cfg.get("PERSISTENT") and name.startswith("nt"):
                    continue
                tile_probe.try_variant(fns, errors, name, fn, ref if act else ref_plain)
    bad = tile_probe.drop_wrong(fns, errors)
    if bad:
        print("WRONG RESULTS:", {k_: errors[k_] for k_ in bad}, flush=True)
    times = time_interleaved(fns, repeat=9, warmup=2, device="cuda")
    flops = 2 * m * n * k
    base = times["cublas gelu(addmm) W.t() [baseline]"].median
    rows = []
    for name, t in sorted(times.items(), key=lambda kv: kv[1].median):
        rows.append({"case": name, "ms": t.median * 1e3, "TFLOPs": flops / t.median / 1e12,
                     "x_baseline": base / t.median, "rel_error": errors[name]})
        print(f"{name:<52} {t.median * 1e3:8.3f} ms {flops / t.median / 1e12:6.0f} TFLOP/s "
              f"x{base / t.median:5.3f} of gelu(addmm)  err {errors[name]:.1e}", flush=True)
    doc = {"command": f"python bench/gpu/matmul_probe.py {mode}", "shape_mkn": [m, k, n],
           "environment": environment("cuda"), "autotuned": tuned, "rows": rows,
           "failed": {k_: v for k_, v in errors.items() if isinstance(v, str)}}
    with open(os.path.join(OUT, f"matmul_probe-{mode}.json"), "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
