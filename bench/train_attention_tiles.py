"""The Triton training attention's backward per tile, against float64 and SDPA (GPU).

    python -m bench.train_attention_tiles [--seeds 3]

For head dims 64 and 128 (bf16, causal, ``q`` of ``(1, 2048 / d, 1024, d)``, 4 KV heads), on
the same random inputs and output gradients: the relative error against float64 autograd of
``out``, ``dq``, ``dk``, ``dv`` for SDPA (its flash/cuDNN kernels) and for the Triton op with
every backward tile ``(BLOCK_M, BLOCK_N, warps, stages)`` listed in ``TILES``, and the Triton
backward's GPU kernel time (profiler, mean of 10 after 3 untimed). ``attention_op._blocks``
is patched per row: this is how its tiles were chosen
(``bench/results/h200/train_attention_bwd_tiles.txt``).
Prints one line a row.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

TILES = [(32, 64, 4, 2), (64, 64, 4, 2), (32, 64, 4, 1), (16, 64, 4, 2), (32, 32, 4, 2),
         (64, 128, 8, 2), (16, 32, 4, 1)]  # fmt: skip


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def _inputs(d: int, seed: int):
    torch.manual_seed(seed)
    hq = 2048 // d
    q, k, v = (torch.randn(1, h, 1024, d, device="cuda").bfloat16().requires_grad_()
               for h in (hq, 4, 4))  # fmt: skip
    g = torch.randn(1, hq, 1024, d, device="cuda").bfloat16()
    return q, k, v, g


def _errors(fn, q, k, v, g, ref) -> list[float]:
    for t in (q, k, v):
        t.grad = None
    o = fn(q, k, v)
    o.backward(g)
    return [_rel(o, ref[0])] + [_rel(t.grad, r) for t, r in zip((q, k, v), ref[1:], strict=True)]


def _backward_kernel_us(o, inputs, g, n: int = 10) -> float:
    """GPU kernel time of one backward, microseconds: the profiler's kernel durations over
    ``n`` backward calls after three untimed ones. Kernel time, not wall time: launched
    eagerly, the host's per-launch cost can exceed these kernels' (``train_op_host_profile``),
    and wall-clock rows then measured the host's jitter, not the tile."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        torch.autograd.grad(o, inputs, g, retain_graph=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            torch.autograd.grad(o, inputs, g, retain_graph=True)
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages())
    return total / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_attention_tiles", description=__doc__)
    ap.add_argument("--seeds", type=int, default=1, help="input draws per head dim")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    from ryzen_opt.kernels import reference
    from ryzen_opt.kernels.triton import training as T
    from ryzen_opt.kernels.triton.training import attention_op as A

    def triton_attn(q, k, v):
        return T.attention(q, k, v, causal=True)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    chosen = A._blocks
    try:
        for d in (64, 128):
            for seed in range(a.seeds):
                q, k, v, g = _inputs(d, seed)
                wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
                out = reference.attention(*wide, causal=True)
                out.backward(g.double())
                ref = [out] + [t.grad for t in wide]
                e = _errors(sdpa, q, k, v, g, ref)
                print(f"d={d} seed={seed} sdpa: out {e[0]:.4f} dq {e[1]:.4f} dk {e[2]:.4f} "
                      f"dv {e[3]:.4f}", flush=True)  # fmt: skip
                for tile in [None, *TILES]:
                    if tile is not None:
                        A._blocks = lambda dd, backward=False, t=tile: (
                            t if backward else chosen(dd, backward)
                        )
                    e = _errors(triton_attn, q, k, v, g, ref)
                    us = _backward_kernel_us(triton_attn(q, k, v), (q, k, v), g)
                    name = "chosen" if tile is None else str(tile)
                    print(f"d={d} seed={seed} triton {name}: out {e[0]:.4f} dq {e[1]:.4f} "
                          f"dk {e[2]:.4f} dv {e[3]:.4f} bwd {us:.0f} us", flush=True)  # fmt: skip
                    A._blocks = chosen
    finally:
        A._blocks = chosen
    return 0


if __name__ == "__main__":
    sys.exit(main())
