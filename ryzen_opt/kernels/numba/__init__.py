"""Numba CPU kernels: matmul, attention, decode_attention, layer_norm (one module each),
and the whole decode steps ``optimize()`` installs: ``decoder_step`` (Hugging Face Llama,
Qwen2, GPT-2 families) and ``decode_step`` (``SimpleTransformerModel``).

Importing an op module registers it with :mod:`ryzen_opt.kernels.registry`. Every kernel is
compiled with ``cache=True``, so the first call in a fresh clone pays the JIT (seconds per
kernel; ~20 s for the Hugging Face decoder step on a 2-core machine) and later processes
load machine code from the disk cache. :func:`warmup` pays that cost up front: before
timing a model, or once when a machine or container image is set up, so that
``optimize()``'s time budget is not spent compiling.
"""

from __future__ import annotations

import time

__all__ = ["warmup"]

_OPS = ("matmul", "attention", "decode_attention", "layer_norm", "decoder_step", "decode_step")


def warmup(ops: tuple[str, ...] = _OPS, progress: bool | None = None) -> float:
    """Compile (or load from the disk cache) every kernel signature the ops use.

    The kernels have one signature each (launchers pass contiguous float32 arrays and fold
    options into runtime flags), so one tiny call per op covers every model shape; the decode
    steps read any model's weights through address tables, so a tiny synthetic model covers
    every model of their families and weight formats. From the command line: ``python -m
    ryzen_opt.kernels.numba [--ops decoder_step,...]``.

    Args:
        ops: which ops to compile, any of ``matmul``, ``attention``, ``decode_attention``,
            ``layer_norm``, ``decoder_step`` (the Hugging Face decoder step and greedy loop)
            and ``decode_step`` (the ``SimpleTransformerModel`` step and greedy loop).
        progress: print a line to standard error as each op starts and ends, with its
            seconds (a cold cache takes ~45 s on 2 cores); ``None``: only when standard
            error is a terminal.

    Returns:
        Seconds spent, i.e. the compile (or cache load) time.

    Example:
        >>> seconds = warmup(("layer_norm",))
    """
    import sys

    import torch

    unknown = [op for op in ops if op not in _OPS] if not isinstance(ops, str) else [ops]
    if unknown:
        raise ValueError(f"ops must be a tuple of names from {_OPS}, got {unknown}")
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"progress must be None or a bool, got {progress!r}")
    show = sys.stderr.isatty() if progress is None else progress

    def matmul():
        from ryzen_opt.kernels.numba.matmul import matmul

        matmul(torch.ones(4, 3), torch.ones(3, 5), torch.ones(5), "gelu", torch.ones(4, 5))

    def attention():
        from ryzen_opt.kernels.numba.attention import attention

        attention(torch.ones(1, 2, 3, 4), torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4), True)

    def decode_attention():
        from ryzen_opt.kernels.numba.decode_attention import decode_attention

        decode_attention(
            torch.ones(1, 2, 4), torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4), torch.tensor([2])
        )

    def layer_norm():
        from ryzen_opt.kernels.numba.layer_norm import layer_norm

        layer_norm(torch.ones(2, 4), torch.ones(4), torch.zeros(4), 1e-5, torch.ones(2, 4))

    runs = {
        "matmul": matmul,
        "attention": attention,
        "decode_attention": decode_attention,
        "layer_norm": layer_norm,
        "decoder_step": _warm_decoder_step,
        "decode_step": _warm_decode_step,
    }
    todo = [op for op in _OPS if op in ops]
    t0 = time.perf_counter()
    for i, op in enumerate(todo, 1):
        if show:
            print(f"warmup {i}/{len(todo)} {op} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        runs[op]()
        if show:
            print(
                f"warmup {i}/{len(todo)} {op}: {time.perf_counter() - t:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    return time.perf_counter() - t0


def _warm_decoder_step() -> None:
    """One step and one greedy call of a one-layer synthetic Llama-shaped layout (GPT-2 and
    the int8/bf16 weights run the same compiled functions)."""
    import numpy as np
    import torch

    from ryzen_opt.kernels.numba.decoder_step import NumbaDecoder
    from ryzen_opt.optimization.fastpaths.decoder_layout import (
        DecoderLayout,
        Layer,
        Linear,
        Norm,
    )

    c, heads, hd, inter, vocab = 8, 2, 4, 16, 16
    g = torch.Generator().manual_seed(0)

    def lin(n, k):
        return Linear(torch.randn(n, k, generator=g) * 0.1)

    def norm():
        return Norm("rms", torch.ones(c), None, 1e-6)

    layer = Layer(
        norm(),
        lin(c, c),
        lin(hd, c),
        lin(hd, c),
        lin(c, c),
        norm(),
        lin(inter, c),
        lin(inter, c),
        lin(c, inter),
    )
    layout = DecoderLayout(
        family="llama",
        vocab=vocab,
        hidden=c,
        heads=heads,
        kv_heads=1,
        head_dim=hd,
        intermediate=inter,
        max_positions=64,
        attn_scale=hd**-0.5,
        embed=torch.randn(vocab, c, generator=g),
        layers=(layer,),
        final_norm=norm(),
        head=lin(vocab, c),
        activation="silu_gate",
        rope_inv_freq=1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd)),
    )
    dec = NumbaDecoder(layout, parallel=True)
    kc, vc = layout.new_cache(2, 8)
    start = np.zeros(2, np.int64)
    dec.step(np.array([1, 2]), kc.numpy(), vc.numpy(), 0, start)
    dec.greedy(np.array([1, 2]), kc.numpy(), vc.numpy(), 1, start, 2)


def _warm_decode_step() -> None:
    """One greedy call of the fused ``SimpleTransformerModel`` step (it compiles the step it
    runs) over a zero-filled arena (every offset 0)."""
    import numpy as np

    from ryzen_opt.kernels.numba.decode_step import greedy_steps, workspace_size

    b, c, heads, ff, vocab, t_max = 2, 8, 2, 16, 16, 8
    arena = np.zeros(vocab * c + 3 * c * c + ff * c, np.float32)
    loff = np.zeros((1, 12), np.int64)
    goff = np.zeros(5, np.int64)
    kc = np.zeros((1, b, heads, t_max, c // heads), np.float32)
    vc = np.zeros_like(kc)
    logits = np.empty((b, vocab), np.float32)
    ws = np.empty(workspace_size(b, c, ff, heads, t_max), np.float32)
    out = np.empty((b, 2), np.int64)
    ids = np.ones(b, np.int64)
    greedy_steps(arena, loff, goff, heads, ff, 1e-5, ids, 0, 2, kc, vc, logits, ws, 2, out)
