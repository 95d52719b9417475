"""Host time per Triton launch (the GPU work here is a few microseconds, so the host bounds it).

PYTHONPATH=. python3 -m bench.triton_overhead
"""

from __future__ import annotations

import cProfile
import pstats
import time
from functools import partial

import torch
import triton
import triton.language as tl

from ryzen_opt.kernels.triton import _launcher
from ryzen_opt.kernels.triton import decode_attention as td
from ryzen_opt.kernels.triton import layer_norm as tln
from ryzen_opt.kernels.triton import matmul as tm


@triton.jit
def _noop_kernel(x_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < N), mask=offs < N)


def _host_us(fn, n=300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main() -> None:
    dt = torch.bfloat16
    x = torch.randn(1, 4096, device="cuda", dtype=dt)
    w = torch.randn(4096, 4096, device="cuda", dtype=dt)
    buf = torch.randn(1024, device="cuda")
    q = torch.randn(8, 32, 128, device="cuda", dtype=dt)
    kc = torch.randn(8, 8, 4096, 128, device="cuda", dtype=dt)
    lens = torch.full((8,), 4096, device="cuda", dtype=torch.int32)
    ln_x = torch.randn(4, 768, device="cuda", dtype=dt)
    ln_w = torch.randn(768, device="cuda", dtype=dt)
    noop_direct = _launcher.CachedLauncher(_noop_kernel)
    library = {
        "tm.matmul M=1 (split-K)": partial(tm.matmul, x, w.t()),
        "tm.matmul M=16": partial(tm.matmul, x.expand(16, -1).contiguous(), w.t()),
        "tln.layer_norm 4x768": partial(tln.layer_norm, ln_x, ln_w, ln_w, 1e-5),
        "td.decode_attention 8x4096": partial(td.decode_attention, q, kc, kc, lens),
    }
    rows = {
        "torch x @ w.t()": partial(torch.matmul, x, w.t()),
        "torch layer_norm 4x768": partial(
            torch.nn.functional.layer_norm, ln_x, (768,), ln_w, ln_w, 1e-5
        ),
        "torch.empty 4x4096 fp32": partial(torch.empty, (4, 1, 1, 4096), device="cuda"),
        "noop triton kernel (3 args), kernel[grid]": lambda: _noop_kernel[(1,)](
            buf, 1024, BLOCK=1024
        ),
        "noop triton kernel (3 args), CachedLauncher": lambda: noop_direct(
            (1,), buf, 1024, BLOCK=1024
        ),
    }
    # The same library calls through Triton's own launch path and through the cached one.
    old = _launcher.set_enabled(False)
    rows.update({f"{name} [triton path]": fn for name, fn in library.items()})
    for name, fn in rows.items():
        print(f"{name:<56} {_host_us(fn):8.1f} us host per call", flush=True)
    _launcher.set_enabled(True)
    plans = tm.eager_plans(False)
    for name, fn in library.items():
        print(f"{name + ' [direct]':<56} {_host_us(fn):8.1f} us host per call", flush=True)
    tm.eager_plans(True)  # the matmul's eager plans (replayed launches) on top
    for name, fn in library.items():
        if name.startswith("tm.matmul"):
            print(f"{name + ' [plan]':<56} {_host_us(fn):8.1f} us host per call", flush=True)
    tm.eager_plans(plans)
    _launcher.set_enabled(old)
    for name, fn in library.items():  # where the direct path's host time goes
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        print(f"\n== profile: {name} [direct{', plan' if plans else ''}], 200 calls")
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
