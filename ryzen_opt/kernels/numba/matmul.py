"""Numba CPU matmul: packed panels, an MR x GEMM_NR register-tile micro-kernel, fused epilogue.

Two paths, both over ``a`` row-major ``(M, K)`` and ``b^T`` row-major ``(N, K)`` (for an
``nn.Linear`` weight ``W`` passed as ``b = W.t()``, ``b^T`` is ``W`` itself: no copy; any
other ``b`` is transposed once, K*N copies against M*N*K FMAs):

* M >= 24 (prefill, training): both operands are packed once per call into k-major panels
  (MR=6 rows of a, GEMM_NR=16 columns of b with AVX2, 32 with AVX-512), then each parallel
  task owns a 96 x 128 output block and walks K in KC=256 slabs calling
  ``_common._fma_tile`` (LLVM-IR micro-kernel, 12 vector accumulators; with AVX2 95 GFLOP/s
  per core on packed data, 78 for the whole serial kernel at 2048 x 256 x 2048, against 47
  for the 3x3 dot-product path below).
* M < 24 (decoding, GEMV-like, bound by streaming ``b``): no packing, 3x3 (or 1x4 for M < 3)
  blocks of dot products over contiguous K runs, column blocks spread over the threads.

Two more serve the decode sizes without any copy (2-D ``a`` with M < 24 and rows of ``b``
or of ``W`` contiguous): ``_matmul_rows.py`` (register tiles over weights read in place;
``matmul`` reaches them after attribute checks only, ~1.9 us of Python).

The epilogue (bias, activation, residual) runs on each output block while it is in cache.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ryzen_opt.kernels import reference, registry
from ryzen_opt.kernels.numba._common import (
    ACT_CODES,
    GEMM_NR,
    JIT,
    MR,
    _dot1x4,
    _dot3x3,
    _fma_tile,
    as_array,
    available,
    cpu_fp32_reason,
    scratch,
    set_threads,
)
from ryzen_opt.kernels.numba._matmul_rows import (
    _epilogue,
    _fast_epilogue,
    _rows_call,
    _rows_matmul,
    _wrows_matmul,
)

# KC=256: 3 A rows + 3 B rows = 6 KiB, well inside the 32 KiB L1; K=64 slabs lose ~40% to the
# nine horizontal sums per tile (36 vs 58 GFLOP/s, one core).
KC = 256
# MB=NB=96: 96 KiB per operand slab in L2; a 2048^2 product is 484 tasks, so 2 threads
# stay balanced to within 0.2%.
MB = 96
NB = 96
# Packed path (M >= PACKED_MIN_M): MB=96 is 16 panels of MR=6 rows, so the packed A slab
# (96*256*4 = 96 KiB) stays in L2 while each GEMM_NR-column B panel (16/32 KiB) sits in L1;
# NB=128 is 8 panels. Below 4 panels of rows the zero padding of the last panel and the
# packing cost more than the 3x3 dot kernel loses.
PMB = 96
PNB = 128
PACKED_MIN_M = 4 * MR
# Below 2**18 FMAs (~5 us of work on one core) the call runs on the calling thread: waking
# the OpenMP pool costs 10-50 us, and on a loaded 2-core box a descheduled worker stalls the
# whole region by a scheduler slice (measured 0.8-10 ms per tiny call with the pool).
SERIAL_FMAS = 1 << 18
# Placeholders for absent bias/residual (never read), allocated once.
_NONE1 = np.zeros(1, dtype=np.float32)
_NONE3 = np.zeros((1, 1, 1), dtype=np.float32)
_NONE2 = np.zeros((1, 1), dtype=np.float32)
_F32 = torch.float32
_default_dtype = torch.get_default_dtype
# Row-tile path (2-D a of fewer rows than this, b (K, N) with contiguous rows): the weight is
# streamed once in ROWS_NR-column panels, all rows of a at a time (see _rows_matmul).
ROWS_MIN_M = PACKED_MIN_M
# Row-tile calls below 2**18 FMAs run on the calling thread, a one-row call counted as two
# rows (so it goes threaded from a 2**17-element, 512 KiB weight). Measured (2 threads, kernel
# only, tight loop): the parallel region alone costs ~2 us (1x8x192: 0.7 us serial, 2.7
# threaded). A single row gains more from the threads than its FMAs say: each thread reads its
# half of the weight from its own core's L2. Xeon VM (2 MiB L2): 1x256x768 5.9 us either way,
# 1x256x1536 14.5 serial vs 8.7 threaded. Zen 4 VM (1 MiB L2), (K, N) / W.t() layouts:
# 1x256x512 5.3 / 4.1 serial vs 4.1 / 3.7 threaded, 1x256x768 6.8 / 5.3 vs 4.8 / 4.5,
# 1x128x768 3.5 / 3.2 vs 3.3 / 3.2, 1x256x256 2.9 / 2.2 vs 3.0 / 2.6 (see NOTES.md).
ROWS_SERIAL_FMAS = 1 << 18


@njit(**JIT)
def _block(a, bt, c, i0, i1, j0, j1, k0, kc, first):
    """c[i0:i1, j0:j1] (+)= a[i0:i1, k0:k0+kc] @ bt[j0:j1, k0:k0+kc].T in 3x3 tiles.

    Edge tiles clamp their row/column indices (recomputing a valid row) instead of padding,
    and store only the valid part.
    """
    k1 = k0 + kc
    if i1 - i0 < 3:
        for i in range(i0, i1):
            ar = a[i, k0:k1]
            for j in range(j0, j1, 4):
                jl = j1 - 1
                s = _dot1x4(
                    ar,
                    bt[j, k0:k1],
                    bt[min(j + 1, jl), k0:k1],
                    bt[min(j + 2, jl), k0:k1],
                    bt[min(j + 3, jl), k0:k1],
                    kc,
                )
                for u in range(min(4, j1 - j)):
                    c[i, j + u] = s[u] if first else c[i, j + u] + s[u]
        return
    for i in range(i0, i1, 3):
        il = i1 - 1
        a0 = a[i, k0:k1]
        a1 = a[min(i + 1, il), k0:k1]
        a2 = a[min(i + 2, il), k0:k1]
        ni = min(3, i1 - i)
        for j in range(j0, j1, 3):
            jl = j1 - 1
            s = _dot3x3(
                a0, a1, a2, bt[j, k0:k1], bt[min(j + 1, jl), k0:k1], bt[min(j + 2, jl), k0:k1], kc
            )
            nj = min(3, j1 - j)
            if ni == 3 and nj == 3 and not first:
                c[i, j] += s[0]
                c[i, j + 1] += s[1]
                c[i, j + 2] += s[2]
                c[i + 1, j] += s[3]
                c[i + 1, j + 1] += s[4]
                c[i + 1, j + 2] += s[5]
                c[i + 2, j] += s[6]
                c[i + 2, j + 1] += s[7]
                c[i + 2, j + 2] += s[8]
            else:
                for r in range(ni):
                    for q in range(nj):
                        v = s[3 * r + q]
                        c[i + r, j + q] = v if first else c[i + r, j + q] + v


@njit(**JIT)
def _matmul_task(a, bt, c, bias, has_bias, res, has_res, act, mb, nb, t):
    """Output block t: a (Ba, M, K), bt (Bb, N, K) with Ba, Bb in {1, B}; c (B, M, N)."""
    nbatch, m, n = c.shape
    k = a.shape[2]
    n_mb = (m + mb - 1) // mb
    n_nb = (n + nb - 1) // nb
    bi = t // (n_mb * n_nb)
    r = t % (n_mb * n_nb)
    i0 = (r // n_nb) * mb
    j0 = (r % n_nb) * nb
    i1 = min(i0 + mb, m)
    j1 = min(j0 + nb, n)
    ab = a[bi if a.shape[0] > 1 else 0]
    bb = bt[bi if bt.shape[0] > 1 else 0]
    cb = c[bi]
    if k == 0:
        cb[i0:i1, j0:j1] = 0.0
    for k0 in range(0, k, KC):
        _block(ab, bb, cb, i0, i1, j0, j1, k0, min(KC, k - k0), k0 == 0)
    rb = res[bi if res.shape[0] > 1 else 0]
    _epilogue(cb, i0, i1, j0, j1, bias, has_bias, rb, has_res, act)


@njit(parallel=True, **JIT)
def _matmul_parallel(a, bt, c, bias, has_bias, res, has_res, act, mb, nb, tasks):
    for t in prange(tasks):
        _matmul_task(a, bt, c, bias, has_bias, res, has_res, act, mb, nb, t)


@njit(**JIT)
def _matmul_serial(a, bt, c, bias, has_bias, res, has_res, act, mb, nb, tasks):
    for t in range(tasks):
        _matmul_task(a, bt, c, bias, has_bias, res, has_res, act, mb, nb, t)


@njit(**JIT)
def _pack_panel(x, r0, width, out):
    """out[k, i] = x[r0 + i, k] for one panel (K, width), rows past x's end zero-padded."""
    rows, k = x.shape
    for i in range(width):
        if r0 + i < rows:
            src = x[r0 + i]
            for kk in range(k):
                out[kk, i] = src[kk]
        else:
            for kk in range(k):
                out[kk, i] = 0.0


@njit(**JIT)
def _pack_job(a, bt, ap, bp, t):
    """Job t packs one MR-row panel of a or one GEMM_NR-column panel of b^T (any batch)."""
    n_a = ap.shape[0] * ap.shape[1]
    if t < n_a:
        bi, p = t // ap.shape[1], t % ap.shape[1]
        _pack_panel(a[bi], p * MR, MR, ap[bi, p])
    else:
        t -= n_a
        bi, q = t // bp.shape[1], t % bp.shape[1]
        _pack_panel(bt[bi], q * GEMM_NR, GEMM_NR, bp[bi, q])


@njit(**JIT)
def _packed_task(ap, bp, c, bias, has_bias, res, has_res, act, mb, nb, t, acc):
    """Output block t from packed panels ap (Ba, M/MR, K, MR), bp (Bb, N/GEMM_NR, K, GEMM_NR)."""
    nbatch, m, n = c.shape
    k = ap.shape[2]
    n_mb = (m + mb - 1) // mb
    n_nb = (n + nb - 1) // nb
    bi = t // (n_mb * n_nb)
    r = t % (n_mb * n_nb)
    i0 = (r // n_nb) * mb
    j0 = (r % n_nb) * nb
    i1 = min(i0 + mb, m)
    j1 = min(j0 + nb, n)
    apb = ap[bi if ap.shape[0] > 1 else 0]
    bpb = bp[bi if bp.shape[0] > 1 else 0]
    cb = c[bi]
    if k == 0:
        cb[i0:i1, j0:j1] = 0.0
    for k0 in range(0, k, KC):
        kc = min(KC, k - k0)
        for jq in range(j0, j1, GEMM_NR):
            nj = min(GEMM_NR, j1 - jq)
            bpan = bpb[jq // GEMM_NR, k0:]
            for ip in range(i0, i1, MR):
                _fma_tile(apb[ip // MR, k0:], bpan, kc, acc)
                for i in range(min(MR, i1 - ip)):
                    crow = cb[ip + i, jq : jq + nj]
                    if k0 == 0:
                        for j in range(nj):
                            crow[j] = acc[i * GEMM_NR + j]
                    else:
                        for j in range(nj):
                            crow[j] += acc[i * GEMM_NR + j]
    rb = res[bi if res.shape[0] > 1 else 0]
    _epilogue(cb, i0, i1, j0, j1, bias, has_bias, rb, has_res, act)


@njit(parallel=True, **JIT)
def _packed_parallel(a, bt, ap, bp, c, bias, has_bias, res, has_res, act, mb, nb, tasks):
    for t in prange(ap.shape[0] * ap.shape[1] + bp.shape[0] * bp.shape[1]):
        _pack_job(a, bt, ap, bp, t)
    for t in prange(tasks):
        acc = np.empty(MR * GEMM_NR, dtype=np.float32)
        _packed_task(ap, bp, c, bias, has_bias, res, has_res, act, mb, nb, t, acc)


@njit(**JIT)
def _packed_serial(a, bt, ap, bp, c, bias, has_bias, res, has_res, act, mb, nb, tasks):
    for t in range(ap.shape[0] * ap.shape[1] + bp.shape[0] * bp.shape[1]):
        _pack_job(a, bt, ap, bp, t)
    acc = np.empty(MR * GEMM_NR, dtype=np.float32)
    for t in range(tasks):
        _packed_task(ap, bp, c, bias, has_bias, res, has_res, act, mb, nb, t, acc)


def _block_sizes(m: int, n: int, threads: int) -> tuple[int, int]:
    """MB x NB, narrowed for skinny M so that every thread gets several column blocks."""
    if m >= MB:
        return MB, NB
    # Skinny (decode-time) M: one row block; NB keeps >= 4 tasks per thread for balance.
    nb = max(12, min(NB, (n // (4 * threads)) // 3 * 3))
    return max(m, 1), nb


def supports(a, b, bias=None, activation=None, residual=None, out_dtype=None):
    """``None`` if the numba matmul serves this call, else why not."""
    for name, t in (("a", a), ("b", b)):
        reason = cpu_fp32_reason(name, t) if isinstance(t, torch.Tensor) else None
        if reason is not None:
            return reason
    return None


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``activation(a @ b + bias) + residual`` in float32 on CPU (see :func:`reference.matmul`).

    Args:
        a: ``(M, K)`` or ``(B, M, K)`` float32, any strides.
        b: ``(K, N)`` or ``(B, K, N)`` float32, any strides.
        bias: optional ``(N,)``.
        activation: ``None``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``"relu"``.
        residual: optional tensor of the output's shape.
        out_dtype: output dtype (default float32).

    Returns:
        The ``(M, N)`` or ``(B, M, N)`` product.

    Example:
        >>> y = matmul(torch.randn(5, 7), torch.randn(7, 3), activation="gelu")
    """
    # Decode-size calls (a few rows times a weight, float32, both operands' rows contiguous,
    # a contiguous float32 bias or none) take the row-tile path after attribute checks only
    # (~1.5 us of Python in all): the general checks and copies below cost more than the
    # product at 1 x 256 x 768 (an nn.Linear with bias: 21.4 us that way, see NOTES.md).
    if residual is None and out_dtype is None:
        try:
            fast = a.dtype is _F32 and b.dtype is _F32 and a.is_cpu and b.is_cpu
            ash, bsh = a.shape, b.shape
        except AttributeError:  # not tensors: the full check words the error
            fast = False
        if fast and len(ash) == 2 and len(bsh) == 2:
            m, k = ash
            kb, n = bsh
            ast, bst = a.stride(), b.stride()
            epi = _fast_epilogue(bias, activation, n)
            if kb == k and 0 < m < ROWS_MIN_M and n and k and ast[1] == 1 and 1 in bst and epi:
                weight_rows = bst[0] == 1  # b = W.t(): W's rows are contiguous
                threads = set_threads()
                # torch.empty(m, n): 0.65 us; with dtype=: 0.86 us (measured).
                c = torch.empty(m, n) if _default_dtype() is _F32 else torch.empty(m, n, dtype=_F32)
                (_wrows_matmul if weight_rows else _rows_matmul)(
                    a.data_ptr(),
                    ast[0],
                    b.data_ptr(),
                    bst[1] if weight_rows else bst[0],
                    c.data_ptr(),
                    m,
                    n,
                    k,
                    epi[0],
                    0,
                    epi[1],
                    threads,
                    ROWS_SERIAL_FMAS,
                )
                return c
    reference.check_matmul_args(a, b, bias, activation, residual, out_dtype)
    reason = supports(a, b, bias, activation, residual, out_dtype)
    if reason is not None:
        raise registry.BackendError(f"numba matmul cannot serve this call: {reason}")
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if (
        a.dim() == 2
        and b.dim() == 2
        and 0 < m < ROWS_MIN_M
        and n > 0
        and k > 0
        and (b.stride(1) == 1 or b.stride(0) == 1)
    ):
        y = _rows_call(
            a if a.stride(1) == 1 else a.contiguous(),
            b,
            m,
            k,
            n,
            bias.to(torch.float32).contiguous() if bias is not None else None,
            ACT_CODES[activation],
            residual.to(torch.float32).contiguous() if residual is not None else None,
            ROWS_SERIAL_FMAS,
        )
        return y.to(out_dtype) if out_dtype is not None else y
    threads = set_threads()
    a3 = (a if a.dim() == 3 else a.unsqueeze(0)).contiguous()
    bt3 = (b if b.dim() == 3 else b.unsqueeze(0)).transpose(-1, -2).contiguous()
    # A batch of 1 broadcasts, also against an empty batch: (0, M, K) @ (K, N) is (0, M, N).
    nbatch = reference.matmul_out_shape(a3, bt3.transpose(-1, -2))[0]
    c = torch.empty((nbatch, m, n), dtype=torch.float32)
    if c.numel():
        bias_ = as_array(bias.to(torch.float32).contiguous()) if bias is not None else _NONE1
        if residual is not None:
            res = as_array(residual.to(torch.float32).reshape(-1, m, n).contiguous())
        else:
            res = _NONE3
        parallel = threads > 1 and nbatch * m * n * k >= SERIAL_FMAS
        args = (
            as_array(a3),
            as_array(bt3),
            as_array(c),
            bias_,
            bias is not None,
            res,
            residual is not None,
            ACT_CODES[activation],
        )
        if m >= PACKED_MIN_M:
            # Both operands packed once per call into k-major panels: (M+N)*K copies, 0.7 ms
            # of the 27 ms serial kernel at 2048 x 256 x 2048 on one core.
            mb = min(PMB, -(-m // MR) * MR)
            tasks = nbatch * -(-m // mb) * -(-n // PNB)
            ap = scratch("matmul_a", (a3.shape[0], -(-m // MR), k, MR))
            bp = scratch("matmul_b", (bt3.shape[0], -(-n // GEMM_NR), k, GEMM_NR))
            run = _packed_parallel if parallel else _packed_serial
            run(args[0], args[1], ap, bp, *args[2:], mb, PNB, tasks)
        else:
            mb, nb = _block_sizes(m, n, threads)
            tasks = nbatch * -(-m // mb) * -(-n // nb)
            run = _matmul_parallel if parallel else _matmul_serial
            run(*args, mb, nb, tasks)
    y = c if a.dim() == 3 or b.dim() == 3 else c[0]
    return y.to(out_dtype) if out_dtype is not None else y


registry.register("matmul", "numba", ("cpu",), matmul, supports=supports, available=available)
