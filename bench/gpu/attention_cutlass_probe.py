"""The CUTLASS attention forward beside cuDNN SDPA and the Triton kernel (GPU only, a probe).

    python bench/gpu/attention_cutlass_probe.py [--only check,time]

Why: the Triton attention forward stays at 0.72-0.84x cuDNN at head dim 128 and 0.87-0.98x
at head dim 64 on the H200 (``bench/results/h200/README.md``); TMA loads, Triton's warp
specialization and hand pipelining did not close it. The library's CUTLASS backend
(``ryzen_opt/kernels/cutlass/attention.py``) runs CUTLASS's warp-specialized FMHA collectives
(a producer warp group, two or three consumer warp groups); this probe measures each of its
schedules (``_build.ATTN_VARIANTS``: tile, consumer warp groups, persistent or not) on
``bench.triton_kernels``' attention cases before one is chosen.

Every kernel (head dim x mask x schedule) is built first, in parallel. ``check`` compares each
against an fp32 reference on odd shapes (query and key lengths not multiples of the tile,
q_len != k_len with the bottom-right causal mask, grouped-query heads, a strided query, a
non-default scale) and its log-sum-exp against ``torch.logsumexp``; a wrong kernel is reported
and not timed. ``time`` times cuDNN SDPA, the Triton kernel and every schedule in interleaved
rounds on the same inputs (``ryzen_opt.timing.time_interleaved``, CUDA events). Writes
``$OUT/attention_cutlass_probe.json``; ratios are SDPA time / candidate time.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import environment
from ryzen_opt.kernels.cutlass import _build
from ryzen_opt.kernels.cutlass import attention as ca
from ryzen_opt.kernels.triton import attention as ta
from ryzen_opt.timing import time_interleaved

OUT = os.environ.get("OUT", ".")
REPEAT = int(os.environ.get("ATTN_PROBE_REPEAT", "10"))
# Relative Frobenius error against fp32: bf16 output, DESIGN.md's bf16 tolerance (measured at
# most 2.2e-3 over 77 checks, attention_cutlass_probe-heavy.json).
MAX_ERR = 1e-2
# Absolute log-sum-exp error: fp32 accumulation, the fp32 tolerance (measured at most 3.8e-6).
MAX_LSE_ERR = 1e-4


def _ref(q, k, v, causal, scale):
    """fp32 attention with the library's bottom-right causal mask; and the row log-sum-exp."""
    g = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    if causal:
        lq, lk = q.shape[2], k.shape[2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ vf, torch.logsumexp(s, -1)


def _run(name, q, k, v, causal, scale):
    """One call of schedule ``name``'s kernel through the library's plan."""
    plan = ca._Plan(q, k, v, causal, name)
    return plan(q, k, v, d_scale(q) if scale is None else scale)


def d_scale(q):
    return q.shape[-1] ** -0.5


def _bound(name, q, k, v, causal):
    """A zero-argument call of schedule ``name`` with its plan made once (as the library's
    repeated calls run)."""
    plan = ca._Plan(q, k, v, causal, name)
    return lambda: plan(q, k, v, d_scale(q))[0]


def _err(out, ref):
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


CHECKS = [
    # (name, batch, q heads, kv heads, q_len, k_len, causal, scale, strided q)
    ("odd", 2, 3, 3, 136, 200, False, None, False),
    ("causal q<k", 2, 3, 3, 136, 200, True, None, False),
    ("causal square", 1, 4, 4, 264, 264, True, None, False),
    ("scale 0.3", 1, 2, 2, 128, 77, False, 0.3, False),
    ("gqa 8/2", 2, 8, 2, 192, 300, True, None, False),
    ("strided q", 2, 4, 4, 256, 256, False, None, True),
    ("one key", 1, 2, 2, 8, 1, False, None, False),
]


def check(results):
    bad = set()
    for d in _build.ATTN_HEAD_DIMS:
        for name, b, hq, hkv, lq, lk, causal, scale, strided in CHECKS:
            torch.manual_seed(0)
            if strided:  # (b, l, h, d) memory seen as (b, h, l, d), as HF attention layers do
                q = torch.randn(b, lq, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            else:
                q = torch.randn(b, hq, lq, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, hkv, lk, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            why = ca.supports(q, k, v, causal, scale)
            if why is not None:
                print(f"check d{d} {name}: not served ({why})")
                continue
            ref, lse_ref = _ref(q, k, v, causal, scale if scale is not None else d**-0.5)
            for variant in _build.ATTN_VARIANTS[d]:
                try:
                    out, lse = _run(variant, q, k, v, causal, scale)
                    torch.cuda.synchronize()
                    e = _err(out, ref)
                    e_lse = float((lse - lse_ref).abs().max())
                except Exception as ex:  # noqa: BLE001 - a probe reports, it does not stop
                    e, e_lse = float("inf"), float("inf")
                    print(f"check d{d} {name} {variant}: {type(ex).__name__}: {ex}"[:300])
                ok = e < MAX_ERR and e_lse < MAX_LSE_ERR
                if not ok:
                    bad.add((d, variant))
                results.append(
                    dict(
                        kind="check",
                        d=d,
                        case=name,
                        variant=variant,
                        rel_err=e,
                        lse_max_abs_err=e_lse,
                        ok=ok,
                    )
                )
                print(
                    f"check d{d} {name:14s} {variant:8s} rel_err {e:.2e} lse {e_lse:.1e} "
                    f"{'ok' if ok else 'WRONG'}"
                )
    return bad


def _sdpa(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def timing(results, bad):
    for d in (64, 128):
        heads = 2048 // d
        for seq in (1024, 4096, 16384):
            batch = max(1, 16384 // seq)
            torch.manual_seed(0)
            q = torch.randn(batch, heads, seq, d, device="cuda", dtype=torch.bfloat16)
            k, v = torch.randn_like(q), torch.randn_like(q)
            for causal in (False, True):
                fns = {
                    "cudnn": _sdpa(q, k, v, causal),
                    "triton": lambda q=q, k=k, v=v, c=causal: ta.attention(q, k, v, c),
                }
                ref = fns["cudnn"]()
                for variant in _build.ATTN_VARIANTS[d]:
                    if (d, variant) in bad:
                        continue
                    fn = _bound(variant, q, k, v, causal)
                    e = _err(fn(), ref.float())
                    if e > MAX_ERR:
                        print(f"time d{d} {seq} {variant}: rel_err {e:.2e} vs cuDNN, not timed")
                        continue
                    fns[variant] = fn
                t = time_interleaved(fns, repeat=REPEAT, warmup=3, device="cuda")
                flops = 4 * batch * heads * seq * seq * d * (0.5 if causal else 1.0)
                base = t["cudnn"].median
                row = dict(
                    kind="time",
                    d=d,
                    shape=[batch, heads, seq, d],
                    causal=causal,
                    ms={n: t[n].median * 1e3 for n in t},
                    tflops={n: flops / t[n].median / 1e12 for n in t},
                    vs_cudnn={n: base / t[n].median for n in t},
                )
                results.append(row)
                cells = "  ".join(
                    f"{n} {row['ms'][n]:.3f} ms {row['vs_cudnn'][n]:.3f}x {row['tflops'][n]:.0f} TF"
                    for n in t
                )
                print(f"time d{d} {batch}x{heads}x{seq} {'causal' if causal else 'full  '} {cells}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="check,time")
    args = ap.parse_args()
    if not torch.cuda.is_available() or ca.available() is not None:
        print(f"cutlass attention unavailable: {ca.available()}")
        return 1
    t0 = time.time()
    built = _build.build_attention()
    print(f"built {len(built)} attention kernels in {time.time() - t0:.0f} s")
    results = []
    bad = check(results) if "check" in args.only else set()
    if "time" in args.only:
        timing(results, bad)
    path = os.path.join(OUT, "attention_cutlass_probe.json")
    with open(path, "w") as f:
        json.dump({"env": environment("cuda"), "repeat": REPEAT, "results": results}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
