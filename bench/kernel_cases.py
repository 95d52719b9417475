"""The cases of ``bench.kernels``: each op on fixed inputs with its PyTorch baseline and work.

``cases(device, quick)`` is deterministic (pyperf workers rebuild it to find their task) and
every case's inputs come from its own seed, so every column of a case sees identical inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Case:
    """One benchmarked call: an op on fixed inputs, its torch baseline and its work."""

    op: str
    label: str
    dtype: torch.dtype
    make: Callable[[str], tuple]  # device -> args for the ryzen_opt op
    torch_fn: Callable[..., Any]  # the baseline, same args
    flops: float = 0.0
    bytes: float = 0.0

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def _rand(*shape, dtype, device, gen):
    if device.startswith("probe:"):  # uninitialised: for supports() decisions only
        return torch.empty(*shape, dtype=dtype, device=device.split(":", 1)[1])
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _matmul_case(m, k, n, dtype, label, epilogue=None, seed=0, weight_t=False) -> Case:
    """``weight_t``: ``b`` is ``W.t()`` of a contiguous ``(n, k)`` weight, as ``nn.Linear``
    passes it, rather than a contiguous ``(k, n)`` matrix."""

    def make(device):
        g = _gen(seed)
        a = _rand(m, k, dtype=dtype, device=device, gen=g)
        if weight_t:
            b = (_rand(n, k, dtype=dtype, device=device, gen=g) / math.sqrt(k)).t()
        else:
            b = _rand(k, n, dtype=dtype, device=device, gen=g) / math.sqrt(k)
        bias = _rand(n, dtype=dtype, device=device, gen=g) if epilogue else None
        return (a, b, bias, "gelu" if epilogue == "gelu" else None, None, None)

    def torch_fn(a, b, bias, act, residual, out_dtype):
        if bias is None:
            return torch.matmul(a, b)
        y = torch.addmm(bias, a, b)
        return F.gelu(y) if act == "gelu" else y

    esize = torch.finfo(dtype).bits // 8
    return Case(
        "matmul", label, dtype, make, torch_fn, 2.0 * m * n * k, esize * (m * k + k * n + m * n)
    )


def _attention_case(b, h, s, d, causal, dtype, label, seed=1) -> Case:
    def make(device):
        g = _gen(seed)
        q, k, v = (_rand(b, h, s, d, dtype=dtype, device=device, gen=g) for _ in range(3))
        return (q, k, v, causal, None, None)

    def torch_fn(q, k, v, causal, scale, mask):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    flops = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    esize = torch.finfo(dtype).bits // 8
    return Case("attention", label, dtype, make, torch_fn, flops, esize * 4 * b * h * s * d)


def _decode_case(b, h, length, d, dtype, label, seed=2) -> Case:
    def make(device):
        g = _gen(seed)
        q = _rand(b, h, d, dtype=dtype, device=device, gen=g)
        kc = _rand(b, h, length, d, dtype=dtype, device=device, gen=g)
        vc = _rand(b, h, length, d, dtype=dtype, device=device, gen=g)
        lengths = torch.full((b,), length, dtype=torch.int64, device=device.split(":")[-1])
        return (q, kc, vc, lengths, None)

    def torch_fn(q, kc, vc, lengths, scale):
        # What a PyTorch decoder does each step: SDPA with a 1-token query over the cache.
        return F.scaled_dot_product_attention(q[:, :, None], kc, vc)[:, :, 0]

    esize = torch.finfo(dtype).bits // 8
    return Case(
        "decode_attention",
        label,
        dtype,
        make,
        torch_fn,
        4.0 * b * h * length * d,
        esize * 2 * b * h * length * d,
    )


def _layer_norm_case(rows, n, dtype, label, seed=3) -> Case:
    def make(device):
        g = _gen(seed)
        x = _rand(rows, n, dtype=dtype, device=device, gen=g)
        r = _rand(rows, n, dtype=dtype, device=device, gen=g)
        w = _rand(n, dtype=dtype, device=device, gen=g)
        bias = _rand(n, dtype=dtype, device=device, gen=g)
        return (x, w, bias, 1e-5, r)

    def torch_fn(x, w, bias, eps, r):
        h = x + r
        return F.layer_norm(h, (n,), w, bias, eps), h

    esize = torch.finfo(dtype).bits // 8
    return Case("layer_norm", label, dtype, make, torch_fn, 8.0 * rows * n, esize * 4 * rows * n)


def _lora_case(rows, hidden, rank, n_adapters, dtype, label, seed=5) -> Case:
    """A LoRA delta over a mixed decode batch: row r uses adapter r % n_adapters."""

    def make(device):
        g = _gen(seed)
        x = _rand(rows, hidden, dtype=dtype, device=device, gen=g)
        a = _rand(n_adapters, rank, hidden, dtype=dtype, device=device, gen=g) / math.sqrt(hidden)
        b = _rand(n_adapters, hidden, rank, dtype=dtype, device=device, gen=g) / math.sqrt(rank)
        dev = device.split(":")[-1]
        scales = torch.full((n_adapters,), 2.0, device=dev)  # alpha / rank = 32 / 16
        indices = torch.arange(rows, device=dev) % n_adapters
        return (x, a, b, scales, indices)

    def torch_fn(x, a, b, scales, indices):
        # What PEFT does for a mixed batch: a pair of matmuls per adapter over its rows.
        from ryzen_opt.kernels import reference

        return reference.lora_bgmv(x, a, b, scales, indices)

    esize = torch.finfo(dtype).bits // 8
    used = min(rows, n_adapters)
    return Case(
        "lora_bgmv",
        label,
        dtype,
        make,
        torch_fn,
        4.0 * rows * rank * hidden,
        esize * (2 * used * rank * hidden + 2 * rows * hidden),
    )


def _copy_case(nbytes: int, dtype: torch.dtype, device: str) -> Case:
    """Memory-bandwidth ceiling: a device-to-device copy (bytes read + written)."""
    numel = nbytes // (torch.finfo(dtype).bits // 8)

    def make(dev):
        g = _gen(4)
        return (
            _rand(numel, dtype=dtype, device=dev, gen=g),
            torch.empty(numel, dtype=dtype, device=dev.split(":")[-1]),
        )

    return Case(
        "ceiling",
        f"copy {nbytes >> 20} MiB",
        dtype,
        make,
        lambda src, dst: dst.copy_(src),
        0.0,
        2.0 * nbytes,
    )


def cases(device: str, quick: bool) -> list[Case]:
    """The benchmark list. Deterministic: pyperf workers rebuild it to find their task."""
    out: list[Case] = []
    if device == "cpu":
        f32 = torch.float32
        # --quick keeps one case per goal of the CPU kernels (about 2 minutes on 2 cores).
        squares = (1024,) if quick else (256, 512, 1024, 2048)
        out += [_matmul_case(s, s, s, f32, f"square {s}") for s in squares]
        # The model's shapes: 16 sequences x 128 tokens, width 256, MLP 512, vocab 2048.
        out.append(_matmul_case(2048, 256, 512, f32, "fc1 2048x256x512 +bias+gelu", "gelu"))
        if not quick:
            out.append(_matmul_case(2048, 512, 256, f32, "fc2 2048x512x256 +bias", "bias"))
            out.append(_matmul_case(2048, 256, 768, f32, "qkv 2048x256x768"))
            out.append(_matmul_case(2048, 256, 2048, f32, "head 2048x256x2048"))
            out.append(_matmul_case(2048, 2048, 256, f32, "2048x2048x256"))
        for m in (16,) if quick else (1, 16):
            out.append(_matmul_case(m, 256, 768, f32, f"decode qkv {m}x256x768"))
        if not quick:  # the nn.Linear call at decode: x @ W.t() + bias
            for m in (1, 16):
                label = f"decode linear {m}x256x768 W.t()+bias"
                out.append(_matmul_case(m, 256, 768, f32, label, "bias", weight_t=True))
        out.append(_attention_case(16, 4, 128, 64, True, f32, "16x4x128x64 causal"))
        out.append(_attention_case(1, 8, 4096, 64, True, f32, "1x8x4096x64 causal"))
        for b in (1, 16):
            for length in (4096,) if quick else (128, 1024, 4096):
                out.append(_decode_case(b, 4, length, 64, f32, f"b{b} h4 cache{length} d64"))
        out.append(_layer_norm_case(2048, 256, f32, "2048x256 +residual"))
        # Mixed-batch LoRA at decode: the seed model's width and a 2048-wide layer.
        for rows in (1, 16):
            for hidden in (2048,) if quick else (256, 2048):
                for n in (4,) if quick else (1, 4, 16):
                    label = f"rows{rows} {hidden}x{hidden} r16 adapters{n}"
                    out.append(_lora_case(rows, hidden, 16, n, f32, label))
        out.append(_copy_case(64 << 20, f32, device))
    else:
        bf16 = torch.bfloat16
        for s in (4096, 8192):
            out.append(_matmul_case(s, s, s, bf16, f"square {s}"))
        out.append(_matmul_case(8192, 4096, 4096, bf16, "8192x4096x4096 +bias+gelu", "gelu"))
        for m in (1, 16, 64):
            out.append(_matmul_case(m, 4096, 4096, bf16, f"skinny {m}x4096x4096"))
        for d in (64, 128):
            for s in (1024, 4096) if quick else (1024, 4096, 16384):
                for causal in (False, True):
                    b, h = max(1, 16384 // s), 2048 // d
                    tag = "causal" if causal else "full"
                    out.append(_attention_case(b, h, s, d, causal, bf16, f"{b}x{h}x{s}x{d} {tag}"))
        for b in (8, 64):
            for length in (4096, 32768):
                if quick and length > 4096 and b > 8:
                    continue
                out.append(_decode_case(b, 8, length, 128, bf16, f"b{b} h8 cache{length} d128"))
        out.append(_layer_norm_case(16384, 4096, bf16, "16384x4096 +residual"))
        for rows in (1, 16, 64):
            for n in (4,) if quick else (1, 4, 16):
                label = f"rows{rows} 4096x4096 r16 adapters{n}"
                out.append(_lora_case(rows, 4096, 16, n, bf16, label))
        out.append(_copy_case(1 << 30, bf16, device))
    return out
