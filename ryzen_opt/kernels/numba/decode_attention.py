"""Numba CPU decode attention: one new query token per row against a KV cache.

Memory-bound: every valid cache entry is read once (2*len*D*4 bytes per kv head) for 4*D
FLOPs, and at decode sizes the fixed cost of a call matters as much as the reads (a batch-1,
128-token, 4-head call reads 256 KiB: ~3 us of kernel at L2 speed). So:

* **One jitted call per op.** The launcher passes tensors as addresses and element strides
  (``data_ptr()``, ~0.08 us each, against ~0.9 us for a numpy view), checks shapes and
  dtypes with plain attribute reads and leaves the value check of ``cache_lengths`` to the
  kernel, which returns a status (the full ``reference.check_decode_args`` runs only to word
  the error). Contiguous inputs are never copied; a cache whose last dim is strided is.
* **Serial below PARALLEL_BYTES**, else a ``prange`` over (batch, kv head, key chunk) tasks:
  the decision is taken inside the jitted function, so a small call never touches the
  thread pool. When there are fewer (batch, kv head) pairs than ``4 * threads`` the keys are
  split into chunks (FlashDecoding); each chunk leaves its max, sum and unnormalised output,
  merged on the calling thread (B*Hq*splits*D work, no second parallel region).
* **Loops the vectorizer keeps in registers.** Scores are one dot product per key over the
  contiguous head dim (the query heads that share a kv head reuse each K row from L1, so GQA
  reads the cache once); ``P V`` adds four V rows per pass over the output row (one load and
  store of the output per four rows). Every loop starts at 0 over a slice: an index range
  with a variable start keeps numba's negative-index wraparound check in the loop, which
  stopped the vectorizer (18 vs 89 GB/s on an L2-resident sum, measured).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from ryzen_opt.kernels import reference, registry
from ryzen_opt.kernels.numba._common import (
    I0,
    JIT,
    _axpys,
    _dots,
    _exp,
    _f32_ptr,
    _i64_ptr,
    _max8,
    available,
    cpu_fp32_reason,
    set_threads,
)

# Below 512 KiB of K+V read (decode b=1, 4 heads, D=64: a 256-token cache) one thread runs
# the call. Measured (2 threads, tight loop, kernel only): 256 KiB serial 5.8 us vs 6.1 us
# threaded; 512 KiB 9.2 vs 8.9 (7.9 unsplit); 1 MiB 16.0 vs 11.2.
PARALLEL_BYTES = 1 << 19
# A split holds at least this many keys (64 KiB of K+V at D=64), so the merge stays small
# against the reads.
MIN_SPLIT = 128
# Keys per block of the score and P V passes (see _attend_chunk).
KB = 64
_F32 = torch.float32
_INTS = (torch.int64, torch.int32)


@njit(**JIT)
def _attend_chunk(kf, vf, k0, v0, skl, svl, qs, d, j0, n, sc, acc, mlo, g_n):
    """softmax-weighted V over keys [j0, j0 + n) of one (batch, kv head), unnormalised.

    ``kf``/``vf`` are flat views of the caches, ``k0``/``v0`` the element offsets of key 0 of
    this head and ``skl``/``svl`` the key strides. ``qs`` (G, D) holds the G query rows that
    share this kv head, already multiplied by the softmax scale. Writes acc[g, :D] (sum p v),
    mlo[g, 0] = max score and mlo[g, 1] = sum p. ``sc`` is (G, >= n) scratch.
    """
    # KB keys at a time (16 KiB of K or V at D=64): the G query heads of a kv head read
    # each block from L1, so GQA streams the cache once.
    for b0 in range(0, n, KB):
        m = min(KB, n - b0)
        for g in range(g_n):
            _dots(qs[g], kf, k0 + (j0 + b0) * skl, skl, m, d, sc[g, b0 : b0 + m])
    for g in range(g_n):
        row = sc[g, :n]
        n8 = n - n % 8
        mx = _max8(row, 0, n8)
        for j in range(n8, n):
            mx = max(mx, row[j])
        total = np.float32(0.0)
        for j in range(n):
            e = _exp(row[j] - mx)
            row[j] = e
            total += e
        mlo[g, 0] = mx
        mlo[g, 1] = total
        out = acc[g, :d]
        for e in range(d):
            out[e] = 0.0
    for b0 in range(0, n, KB):
        m = min(KB, n - b0)
        for g in range(g_n):
            _axpys(sc[g, b0 : b0 + m], vf, v0 + (j0 + b0) * svl, svl, m, d, acc[g, :d])


@njit(**JIT)
def _run(qf, kf, vf, lens, outf, parts, dims, strides, scale, n_split, t0, t1):
    """Tasks [t0, t1) with one set of scratch arrays."""
    g_n = dims[1] // dims[2]
    d = dims[4]
    longest = 0
    for b in range(lens.size):
        longest = max(longest, lens[b])
    # One allocation for all scratch (each costs ~0.1 us, and a decode call is a few us).
    chunk = (longest + n_split - 1) // n_split
    size = g_n * (2 * d + 2 + chunk)
    buf = np.empty(size, dtype=np.float32)
    # Views of a pointer-made array carry no reference count: the task code slices these
    # buffers tens of times a task, each slice of an owned array an atomic inc/dec pair.
    ws = numba.carray(_f32_ptr(buf.ctypes.data), (size,))
    qs = ws[: g_n * d].reshape((g_n, d))
    acc = ws[g_n * d : 2 * g_n * d].reshape((g_n, d))
    mlo = ws[2 * g_n * d : g_n * (2 * d + 2)].reshape((g_n, 2))
    sc = ws[g_n * (2 * d + 2) :].reshape((g_n, chunk))
    for t in range(t0, t1):
        _task(qf, kf, vf, lens, outf, parts, dims, strides, scale, n_split, t, qs, sc, mlo, acc)
    # A use of buf after the tasks: numba frees an array after its last use, and the views
    # above do not hold it.
    return buf.size


@njit(**JIT)
def _task(qf, kf, vf, lens, outf, parts, dims, strides, scale, n_split, t, qs, sc, mlo, acc):
    """Task t = (batch, kv head, split). Writes the normalised output when n_split == 1, else
    this split's (max, sum, unnormalised output) rows of ``parts`` (B, Hq, n_split, D + 2)."""
    hq, hkv, d = dims[1], dims[2], dims[4]
    qsb, qsh, ksb, ksh, ksl, vsb, vsh, vsl = (
        strides[0],
        strides[1],
        strides[2],
        strides[3],
        strides[4],
        strides[5],
        strides[6],
        strides[7],
    )
    g_n = hq // hkv
    b = t // (hkv * n_split)
    h = (t // n_split) % hkv
    sp = t % n_split
    length = lens[b]
    chunk = (length + n_split - 1) // n_split
    j0 = sp * chunk
    n = min(length - j0, chunk)
    if n <= 0:
        if n_split == 1:
            for g in range(g_n):
                o = (b * hq + h * g_n + g) * d
                for e in range(d):
                    outf[o + e] = 0.0
        return
    for g in range(g_n):
        o = b * qsb + (h * g_n + g) * qsh
        qr = qf[o : o + d]
        qsg = qs[g]
        for e in range(d):
            qsg[e] = qr[e] * scale
    k0, v0 = b * ksb + h * ksh, b * vsb + h * vsh
    _attend_chunk(kf, vf, k0, v0, ksl, vsl, qs, d, j0, n, sc, acc, mlo, g_n)
    if n_split == 1:
        for g in range(g_n):
            inv = np.float32(1.0) / mlo[g, 1]
            o = (b * hq + h * g_n + g) * d
            og = outf[o : o + d]
            ag = acc[g]
            for e in range(d):
                og[e] = ag[e] * inv
    else:
        for g in range(g_n):
            pg = parts[b, h * g_n + g, sp]
            pg[0] = mlo[g, 0]
            pg[1] = mlo[g, 1]
            ag = acc[g]
            for e in range(d):
                pg[2 + e] = ag[e]


@njit(**JIT)
def _merge(lens, outf, parts, dims, n_split):
    """out[b, h] = sum_s exp(m_s - m) o_s / sum_s exp(m_s - m) l_s over the non-empty splits."""
    b_n, hq, d = dims[0], dims[1], dims[4]
    for b in range(b_n):
        length = lens[b]
        chunk = (length + n_split - 1) // n_split
        for h in range(hq):
            og = outf[(b * hq + h) * d : (b * hq + h + 1) * d]
            for e in range(d):
                og[e] = 0.0
            if length <= 0:
                continue
            mx = np.float32(-np.inf)
            for sp in range(n_split):
                if sp * chunk < length:
                    mx = max(mx, parts[b, h, sp, 0])
            total = np.float32(0.0)
            for sp in range(n_split):
                if sp * chunk < length:
                    w = _exp(parts[b, h, sp, 0] - mx)
                    total += w * parts[b, h, sp, 1]
                    po = parts[b, h, sp, 2:]
                    for e in range(d):
                        og[e] += w * po[e]
            inv = np.float32(1.0) / total
            for e in range(d):
                og[e] *= inv


@njit(**JIT)
def _plan(lens, dims, threads, parallel_bytes, min_split):
    """(status, n_split, parallel): status 1 if a length lies outside [0, max_len]."""
    b_n, hkv, max_len, d = dims[0], dims[2], dims[3], dims[4]
    total = 0
    longest = 0
    for b in range(b_n):
        length = lens[b]
        if length < 0 or length > max_len:
            return 1, 1, False
        total += length
        longest = max(longest, length)
    parallel = threads > 1 and total * hkv * d * 8 >= parallel_bytes
    n_split = 1
    pairs = b_n * hkv
    if parallel and pairs % threads != 0:
        # The fewest splits that give every thread the same number of tasks (pairs = 1 or 3
        # on 2 threads: 2 splits). Balanced pairs are not split: at b=1, 4 heads, 1024 keys,
        # 2 splits were 7% slower than none (19.7 vs 18.4 us, measured).
        a, c = pairs, threads
        while c:
            a, c = c, a % c
        n_split = max(1, min(threads // a, longest // max(min_split, 1)))
    return 0, n_split, parallel


@njit(**JIT)
def _span(b_n, h_n, l_n, d, sb, sh, sl):
    """Elements from a (B, H, L, D) view's first to its last (last dim contiguous)."""
    return (b_n - 1) * sb + (h_n - 1) * sh + (l_n - 1) * sl + d


@njit(**JIT)
def _views(qa, ka, va, oa, dims, strides):
    b_n, hq, hkv, max_len, d = dims[0], dims[1], dims[2], dims[3], dims[4]
    qf = numba.carray(_f32_ptr(qa), (_span(b_n, hq, 1, d, strides[0], strides[1], 0),))
    kf = numba.carray(
        _f32_ptr(ka), (_span(b_n, hkv, max_len, d, strides[2], strides[3], strides[4]),)
    )
    vf = numba.carray(
        _f32_ptr(va), (_span(b_n, hkv, max_len, d, strides[5], strides[6], strides[7]),)
    )
    outf = numba.carray(_f32_ptr(oa), (b_n * hq * d,))
    return qf, kf, vf, outf


@njit(parallel=True, **JIT)
def _decode(qa, ka, va, la, oa, dims, strides, scale, threads, parallel_bytes, min_split):
    """The whole op; returns 0, or 1 when a length lies outside [0, max_len] (nothing written).

    Explicit loops only: in a ``parallel=True`` function an array expression becomes a
    parallel region of its own, which would wake the pool on the serial path too.
    """
    b_n, hq, hkv, max_len, d = dims[0], dims[1], dims[2], dims[3], dims[4]
    lens = numba.carray(_i64_ptr(la), (b_n,))
    status, n_split, parallel = _plan(lens, dims, threads, parallel_bytes, min_split)
    if status != 0:
        return status
    if max_len == 0:  # every length is 0: zeros
        outz = numba.carray(_f32_ptr(oa), (b_n * hq * d,))
        for i in range(b_n * hq * d):
            outz[i] = 0.0
        return 0
    qf, kf, vf, outf = _views(qa, ka, va, oa, dims, strides)
    sc = np.float32(scale)
    tasks = b_n * hkv * n_split
    if n_split > 1:
        parts = np.empty((b_n, hq, n_split, d + 2), dtype=np.float32)
    else:  # never read or written: a view of the output gives the calls one type, no malloc
        parts = numba.carray(_f32_ptr(oa), (1, 1, 1, 1))
    if parallel:
        # One contiguous run of tasks per thread, so each allocates its scratch once.
        workers = min(threads, tasks)
        for w in prange(workers):
            t0 = w * tasks // workers
            t1 = (w + 1) * tasks // workers
            _run(qf, kf, vf, lens, outf, parts, dims, strides, sc, n_split, t0, t1)
    else:
        _run(qf, kf, vf, lens, outf, parts, dims, strides, sc, n_split, I0, tasks)
    if n_split > 1:
        _merge(lens, outf, parts, dims, n_split)
    return 0


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


def _check_slow(q, k_cache, v_cache, cache_lengths, scale) -> float | None:
    """The full argument check and backend check (errors name the argument); the scale."""
    reference.check_decode_args(q, k_cache, v_cache, cache_lengths, scale)
    reason = supports(q, k_cache, v_cache, cache_lengths, scale)
    if reason is not None:
        raise registry.BackendError(f"numba decode_attention cannot serve this call: {reason}")
    return None if scale is None else float(scale)


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
            ``cache_lengths[b]``. Any strides; only a strided last dim is copied.
        cache_lengths: ``(B,)`` int32/int64.
        scale: softmax scale (default ``1/sqrt(D)``).

    Returns:
        ``(B, Hq, D)``; rows with length 0 are zeros.

    Example:
        >>> o = decode_attention(torch.randn(2, 4, 8), torch.randn(2, 2, 16, 8),
        ...                      torch.randn(2, 2, 16, 8), torch.tensor([3, 16]))
    """
    # The common call is checked with attribute reads only (~1 us; the full check is ~5 us):
    # float32 CPU tensors of matching shapes, int64/int32 lengths, a finite float or None.
    try:
        qs, ks = q.shape, k_cache.shape
        fast = (
            q.dtype is _F32
            and k_cache.dtype is _F32
            and v_cache.dtype is _F32
            and cache_lengths.dtype in _INTS
            and q.is_cpu
            and k_cache.is_cpu
            and v_cache.is_cpu
            and cache_lengths.is_cpu
            and len(qs) == 3
            and len(ks) == 4
            and v_cache.shape == ks
            and ks[0] == qs[0]
            and ks[3] == qs[2]
            and ks[1] > 0
            and qs[1] % ks[1] == 0
            and cache_lengths.dim() == 1
            and cache_lengths.numel() == qs[0]
            and (scale is None or (type(scale) is float and math.isfinite(scale)))
        )
    except AttributeError:  # not tensors: the full check words the error
        fast = False
    if not fast:
        scale = _check_slow(q, k_cache, v_cache, cache_lengths, scale)
        qs, ks = q.shape, k_cache.shape
    threads = set_threads()
    qst, kst, vst = q.stride(), k_cache.stride(), v_cache.stride()
    if qst[2] != 1:
        q = q.contiguous()
        qst = q.stride()
    if kst[3] != 1:
        k_cache = k_cache.contiguous()
        kst = k_cache.stride()
    if vst[3] != 1:
        v_cache = v_cache.contiguous()
        vst = v_cache.stride()
    if cache_lengths.dtype is not torch.int64 or not cache_lengths.is_contiguous():
        cache_lengths = cache_lengths.to(torch.int64).contiguous()
    b, hq, d = qs
    out = torch.empty_like(q) if q.is_contiguous() else torch.empty(qs, dtype=_F32)
    if b == 0 or hq == 0 or d == 0:
        return out
    status = _decode(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        cache_lengths.data_ptr(),
        out.data_ptr(),
        (b, hq, ks[1], ks[2], d),
        (qst[0], qst[1], kst[0], kst[1], kst[2], vst[0], vst[1], vst[2]),
        d**-0.5 if scale is None else scale,
        threads,
        PARALLEL_BYTES,
        MIN_SPLIT,
    )
    if status != 0:
        reference.check_decode_args(q, k_cache, v_cache, cache_lengths, scale)  # words it
        raise ValueError(f"cache_lengths must lie in [0, {ks[2]}]")
    return out


registry.register(
    "decode_attention", "numba", ("cpu",), decode_attention, supports=supports, available=available
)
