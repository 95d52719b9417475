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

from ryzen_opt.kernels.triton import decode_attention as td
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
    rows = {
        "torch x @ w.t()": partial(torch.matmul, x, w.t()),
        "noop triton kernel (3 args)": lambda: _noop_kernel[(1,)](buf, 1024, BLOCK=1024),
        "tm.matmul M=1 (split-K, 2 launches)": partial(tm.matmul, x, w.t()),
        "tm._launch M=1": partial(tm._launch, x, w.t(), None, None, None, None),
        "torch.empty 4x4096 fp32": partial(torch.empty, (4, 1, 1, 4096), device="cuda"),
        "td.decode_attention 8x4096": partial(td.decode_attention, q, kc, kc, lens),
        "td._launch 8x4096": partial(td._launch, q, kc, kc, lens, None),
    }
    for name, fn in rows.items():
        print(f"{name:<40} {_host_us(fn):8.1f} us host per call", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        tm.matmul(x, w.t())
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
