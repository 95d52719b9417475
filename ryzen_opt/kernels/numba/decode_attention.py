"""Numba CPU decode attention: one new query token per row against a KV cache.

Memory-bound: every valid cache entry is read once (2*len*D*4 bytes per kv head) for 4*D
FLOPs, so the kernel is organised around the reads. One task per (batch, kv head, split): the
``Hq/Hkv`` query heads that share a kv head are served together, so GQA reads each K/V row
once, not once per query head. Scores use 3x3 dot tiles (query heads x keys, over D); the
softmax runs on a length-``len`` score row (16 KiB at 4096 tokens, stays in L1/L2); the
output is an axpy over V rows, which the loop vectorizer keeps in ymm registers for D=64.

Long caches with fewer (batch, kv head) pairs than threads are also split along the sequence
(FlashDecoding): each split keeps its own max/sum/partial output, merged at the end.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from ryzen_opt.kernels import reference, registry
from ryzen_opt.kernels.numba._common import (
    JIT,
    _dot1x4,
    _dot3x3,
    _exp,
    as_array,
    available,
    cpu_fp32_reason,
    set_threads,
)

# A split must hold at least this many keys: below 512 keys (256 KiB of K+V at D=64) the
# merge and the second pool wake-up cost more than the halved read time.
MIN_SPLIT = 512


@njit(**JIT)
def _split_partial(qg, kc, vc, j0, j1, s, o, scale):
    """Unnormalised softmax(qg k^T) v over keys [j0, j1) for the G query rows of qg.

    Returns nothing; writes o[g, :D] (sum p v), and s[g, 0] = max, s[g, 1] = sum p.
    """
    g_n, d = qg.shape
    n = j1 - j0
    sc = np.empty((g_n, n), dtype=np.float32)
    if g_n < 3:
        # Fewer than 3 query heads per kv head (plain multi-head): 1x4 dot blocks, since the
        # 3x3 block would compute every score 3 times over a clamped row.
        for r in range(g_n):
            for c in range(0, n, 4):
                cl = j1 - 1
                t4 = _dot1x4(
                    qg[r],
                    kc[j0 + c],
                    kc[min(j0 + c + 1, cl)],
                    kc[min(j0 + c + 2, cl)],
                    kc[min(j0 + c + 3, cl)],
                    d,
                )
                for w in range(min(4, n - c)):
                    sc[r, c + w] = t4[w]
    for r in range(0, g_n if g_n >= 3 else 0, 3):
        rl = g_n - 1
        q0, q1, q2 = qg[r], qg[min(r + 1, rl)], qg[min(r + 2, rl)]
        nr = min(3, g_n - r)
        for c in range(0, n, 3):
            cl = j1 - 1
            t = _dot3x3(q0, q1, q2, kc[j0 + c], kc[min(j0 + c + 1, cl)], kc[min(j0 + c + 2, cl)], d)
            nc = min(3, n - c)
            for u in range(nr):
                for w in range(nc):
                    sc[r + u, c + w] = t[3 * u + w]
    for g in range(g_n):
        row = sc[g]
        mx = np.float32(-np.inf)
        for c in range(n):
            row[c] *= scale
            mx = max(mx, row[c])
        total = np.float32(0.0)
        for c in range(n):
            p = _exp(row[c] - mx)
            row[c] = p
            total += p
        acc = o[g]
        acc[:] = 0.0
        for c in range(n):
            p = row[c]
            vr = vc[j0 + c]
            for e in range(d):
                acc[e] += p * vr[e]
        s[g, 0] = mx
        s[g, 1] = total


@njit(**JIT)
def _partial_task(q, kc, vc, lengths, part_s, part_o, scale, n_split, t):
    """Task t = (batch, kv head, split): q (B, Hq, D); kc/vc (B, Hkv, L, D)."""
    hq = q.shape[1]
    hkv = kc.shape[1]
    group = hq // hkv
    b = t // (hkv * n_split)
    h = (t // n_split) % hkv
    sp = t % n_split
    length = lengths[b]
    chunk = (length + n_split - 1) // n_split
    j0 = sp * chunk
    j1 = min(length, j0 + chunk)
    if j1 > j0:
        g0, g1 = h * group, (h + 1) * group
        _split_partial(
            q[b, g0:g1],
            kc[b, h],
            vc[b, h],
            j0,
            j1,
            part_s[b, g0:g1, sp],
            part_o[b, g0:g1, sp],
            scale,
        )


@njit(**JIT)
def _combine_task(out, lengths, part_s, part_o, n_split, t):
    """Merge the splits of (batch, query head) t, rescaling each by exp(max_split - max)."""
    hq, d = out.shape[1], out.shape[2]
    b = t // hq
    h = t % hq
    o = out[b, h]
    o[:] = 0.0
    if lengths[b] <= 0:
        return
    chunk = (lengths[b] + n_split - 1) // n_split
    mx = np.float32(-np.inf)
    for sp in range(n_split):
        if sp * chunk < lengths[b]:
            mx = max(mx, part_s[b, h, sp, 0])
    total = np.float32(0.0)
    for sp in range(n_split):
        if sp * chunk < lengths[b]:
            w = _exp(part_s[b, h, sp, 0] - mx)
            total += w * part_s[b, h, sp, 1]
            for e in range(d):
                o[e] += w * part_o[b, h, sp, e]
    inv = np.float32(1.0) / total
    for e in range(d):
        o[e] *= inv


@njit(parallel=True, **JIT)
def _decode_parallel(q, kc, vc, lengths, out, part_s, part_o, scale, n_split):
    for t in prange(q.shape[0] * kc.shape[1] * n_split):
        _partial_task(q, kc, vc, lengths, part_s, part_o, scale, n_split, t)
    # The merge is B*Hq*D work: run it on the calling thread. A second parallel region costs
    # another pool barrier, and on the loaded 2-core box each barrier can wait out a whole
    # scheduler slice (decode timings quantized at 8 ms vs 16 ms: one vs two regions).
    for t in range(q.shape[0] * q.shape[1]):
        _combine_task(out, lengths, part_s, part_o, n_split, t)


@njit(**JIT)
def _decode_serial(q, kc, vc, lengths, out, part_s, part_o, scale, n_split):
    for t in range(q.shape[0] * kc.shape[1] * n_split):
        _partial_task(q, kc, vc, lengths, part_s, part_o, scale, n_split, t)
    for t in range(q.shape[0] * q.shape[1]):
        _combine_task(out, lengths, part_s, part_o, n_split, t)


def supports(q, k_cache, v_cache, cache_lengths, scale=None):
    """``None`` if the numba decode attention serves this call, else why not."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if isinstance(t, torch.Tensor):
            reason = cpu_fp32_reason(name, t)
            if reason is not None:
                return reason
    if isinstance(cache_lengths, torch.Tensor) and cache_lengths.device.type != "cpu":
        return f"cache_lengths is on {cache_lengths.device}, numba kernels run on cpu"
    return None


def _n_split(pairs: int, max_len: int, threads: int) -> int:
    if pairs >= threads:
        return 1
    return max(1, min(threads // max(pairs, 1) * 2, max_len // MIN_SPLIT))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One query token per row against a KV cache, float32 on CPU.

    See :func:`reference.decode_attention`.

    Args:
        q: ``(B, Hq, D)``.
        k_cache, v_cache: ``(B, Hkv, max_len, D)``; row ``b`` is valid up to
            ``cache_lengths[b]``.
        cache_lengths: ``(B,)`` int32/int64.
        scale: softmax scale (default ``1/sqrt(D)``).

    Returns:
        ``(B, Hq, D)``; rows with length 0 are zeros.

    Example:
        >>> o = decode_attention(torch.randn(2, 4, 8), torch.randn(2, 2, 16, 8),
        ...                      torch.randn(2, 2, 16, 8), torch.tensor([3, 16]))
    """
    reference.check_decode_args(q, k_cache, v_cache, cache_lengths, scale)
    reason = supports(q, k_cache, v_cache, cache_lengths, scale)
    if reason is not None:
        raise registry.BackendError(f"numba decode_attention cannot serve this call: {reason}")
    threads = set_threads()
    b, hq, d = q.shape
    out = torch.empty((b, hq, d), dtype=torch.float32)
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    lengths = cache_lengths.to(torch.int64).contiguous()
    n_split = _n_split(b * k_cache.shape[1], k_cache.shape[2], threads)
    part_s = torch.empty((b, hq, n_split, 2), dtype=torch.float32)
    part_o = torch.empty((b, hq, n_split, d), dtype=torch.float32)
    # Serial below 2**16 cache entries read (~20 us): the OpenMP wake-up would dominate.
    small = b * k_cache.shape[1] * int(lengths.max()) * d < (1 << 16)
    run = _decode_serial if threads == 1 or small else _decode_parallel
    run(
        as_array(q.contiguous()),
        as_array(k_cache.contiguous()),
        as_array(v_cache.contiguous()),
        as_array(lengths),
        as_array(out),
        as_array(part_s),
        as_array(part_o),
        np.float32(scale),
        n_split,
    )
    return out


registry.register(
    "decode_attention", "numba", ("cpu",), decode_attention, supports=supports, available=available
)
