"""Numba CPU matmul at decode sizes: a few rows of ``a`` times a weight, read in place.

Two layouts of ``b`` (2-D ``a`` with M < ``matmul.ROWS_MIN_M`` rows, ``a``'s rows contiguous):

* ``b`` (K, N) with contiguous rows (a weight stored transposed once): ``_rows_matmul``
  runs 4/2/1-row x 6-vector register tiles (``_common._make_rows_tile``, 16 lanes with
  AVX-512, else 8) over the full K, each thread on its own columns, so the weight is read
  once per call (1x256x768: 0.10x -> ~1.0x torch, see NOTES.md).
* ``b = W.t()`` (the ``nn.Linear`` layout, W's rows contiguous): ``_wrows_matmul``, eight
  weight rows at a time against three rows of ``a`` (``_dots_tile``, 24 zmm accumulators;
  one row with AVX2), W read in place.

Both take ``a``, ``b``, the output, a bias and a residual as addresses and strides (a numpy
view costs ~0.9 us a tensor) and decide serial vs threaded themselves. ``matmul.matmul``
reaches them after attribute checks only (``_fast_epilogue`` for the bias and activation).
``_epilogue`` (bias, activation, residual on an output block) also serves the other paths.
"""

from __future__ import annotations

import numba
import torch
from numba import njit, prange

from ryzen_opt.kernels.numba._common import (
    ACT_CODES,
    I0,
    JIT,
    ROWS_MR,
    ROWS_NR,
    VW,
    _activate,
    _dots,
    _f32_ptr,
    _rows_tile1,
    _rows_tile1_v1,
    _rows_tile1_v2,
    _rows_tile2,
    _rows_tile2_v1,
    _rows_tile2_v2,
    _rows_tile_max,
    _rows_tile_max_v1,
    _rows_tile_max_v2,
    set_threads,
)
from ryzen_opt.kernels.numba._dots_tile import (
    WROWS_MR,
    _dots_tile1,
    _dots_tile2,
    _dots_tile_max,
)

_F32 = torch.float32


@njit(**JIT)
def _epilogue(c, i0, i1, j0, j1, bias, has_bias, res, has_res, act):
    """activation(c + bias) + residual on the block, one contiguous row at a time.

    One loop per activation, so each is a branch-free loop that LLVM vectorizes. Every loop
    reads slices from index 0: ``bias[j0 + j]`` kept numba's negative-index select in the
    loop and stayed scalar (16 x 768 bias add: ~13 us, measured; sliced: see NOTES.md).
    """
    bv = bias[j0:j1] if has_bias else bias
    for i in range(i0, i1):
        row = c[i, j0:j1]
        nj = j1 - j0
        if has_bias:
            for j in range(nj):
                row[j] += bv[j]
        if act == 1:
            for j in range(nj):
                row[j] = _activate(row[j], 1)
        elif act == 2:
            for j in range(nj):
                row[j] = _activate(row[j], 2)
        elif act == 3:
            for j in range(nj):
                row[j] = _activate(row[j], 3)
        elif act == 4:
            for j in range(nj):
                row[j] = _activate(row[j], 4)
        if has_res:
            rr = res[i, j0:j1]
            for j in range(nj):
                row[j] += rr[j]


def _make_column_sweep(tile_max, tile2, tile1):
    """An njit function ``sweep(af, lda, bf, ldb, cf, m, n, k, c0)``: the columns from ``c0``
    that one tile width covers, for all m rows, in tiles of ROWS_MR rows, then 2, then 1."""

    @njit(**JIT)
    def sweep(af, lda, bf, ldb, cf, m, n, k, c0):
        i = 0
        while i + ROWS_MR <= m:
            tile_max(af, i * lda, lda, bf, c0, ldb, k, cf, i * n + c0, n)
            i += ROWS_MR
        if ROWS_MR > 2 and i + 2 <= m:
            tile2(af, i * lda, lda, bf, c0, ldb, k, cf, i * n + c0, n)
            i += 2
        if i < m:
            tile1(af, i * lda, lda, bf, c0, ldb, k, cf, i * n + c0, n)

    return sweep


_sweep_panel = _make_column_sweep(_rows_tile_max, _rows_tile2, _rows_tile1)  # ROWS_NR columns
_sweep_v2 = _make_column_sweep(_rows_tile_max_v2, _rows_tile2_v2, _rows_tile1_v2)  # 2 vectors
_sweep_v1 = _make_column_sweep(_rows_tile_max_v1, _rows_tile2_v1, _rows_tile1_v1)  # 1 vector


@njit(**JIT)
def _rows_narrow(af, lda, bf, ldb, cf, m, n, k, c0, nv):
    """c[:, c0:c0 + nv*VW] = a @ b[:, ...] for all m rows: the whole vectors of a ragged
    last panel, two vectors a tile, then one."""
    for h in range(0, nv, 2):
        if nv - h >= 2:
            _sweep_v2(af, lda, bf, ldb, cf, m, n, k, c0 + h * VW)
        else:
            _sweep_v1(af, lda, bf, ldb, cf, m, n, k, c0 + h * VW)


@njit(**JIT)
def _rows_columns(af, lda, bf, ldb, cf, m, n, k, j0, j1):
    """c[:, j0:j1] = a @ b[:, j0:j1] for all m rows (a: m x k, b: k x n row-major, in place).

    Full ROWS_NR-wide blocks use the register tiles (4/2/1 rows); a ragged last block its
    whole vectors in narrower tiles (``_rows_narrow``), its last < VW columns an axpy loop
    over b's rows.
    """
    for c0 in range(j0, j1, ROWS_NR):
        nj = min(ROWS_NR, j1 - c0)
        if nj == ROWS_NR:
            _sweep_panel(af, lda, bf, ldb, cf, m, n, k, c0)
        else:
            nv = nj // VW
            if nv > 0:
                _rows_narrow(af, lda, bf, ldb, cf, m, n, k, c0, nv)
            t0 = c0 + nv * VW  # the last < VW columns
            nt = nj - nv * VW
            if nt == 0:
                continue
            for i in range(m):
                crow = cf[i * n + t0 : i * n + t0 + nt]
                for e in range(nt):
                    crow[e] = 0.0
                ar = af[i * lda : i * lda + k]
                for p in range(k):
                    x = ar[p]
                    br = bf[p * ldb + t0 : p * ldb + t0 + nt]
                    for e in range(nt):
                        crow[e] += x * br[e]


@njit(**JIT)
def _rows_range(af, lda, bf, ldb, cf, m, n, k, blk0, blk1, bias, has_bias, res, has_res, act):
    """Column blocks [blk0, blk1) of ROWS_NR columns, product then epilogue."""
    j0 = blk0 * ROWS_NR
    j1 = min(n, blk1 * ROWS_NR)
    if j1 <= j0:
        return
    _rows_columns(af, lda, bf, ldb, cf, m, n, k, j0, j1)
    if has_bias or has_res or act != 0:
        c2 = cf.reshape((m, n))
        _epilogue(c2, I0, m, j0, j1, bias, has_bias, res, has_res, act)


@njit(**JIT)
def _epilogue_operands(c_addr, bias_addr, res_addr, m, n):
    """``(bias, has_bias, res, has_res)`` views at the addresses (0: absent). Absent operands
    are never read; their views (over ``c``) only give the calls one type."""
    has_bias = bias_addr != 0
    has_res = res_addr != 0
    bias = numba.carray(_f32_ptr(bias_addr if has_bias else c_addr), (n if has_bias else 1,))
    res = numba.carray(_f32_ptr(res_addr if has_res else c_addr), (m if has_res else 1, n))
    return bias, has_bias, res, has_res


@njit(**JIT)
def _use_threads(threads, m, n, k, serial, blocks):
    """Whether a decode-size call runs on the pool: more than one thread and one block, and
    at least ``serial`` FMAs with a single row counted as two. One row gains more from the
    threads than its FMAs say, because each thread reads its half of the weight from its own
    core's L2 (see ``matmul.ROWS_SERIAL_FMAS``)."""
    return threads > 1 and blocks > 1 and max(m, 2) * n * k >= serial


@njit(parallel=True, **JIT)
def _rows_matmul(
    a_addr, lda, b_addr, ldb, c_addr, m, n, k, bias_addr, res_addr, act, threads, serial
):
    """c (m x n, new) = act(a (m x k) @ b (k x n) + bias) + res, read through addresses.

    ``bias_addr``/``res_addr`` are 0 when absent (``res`` is a contiguous (m, n)). The weight
    is read once: the threads split its columns and every thread runs all m rows on its own
    columns. One thread below ``serial`` FMAs (``_use_threads``).
    """
    af = numba.carray(_f32_ptr(a_addr), ((m - 1) * lda + k,))
    bf = numba.carray(_f32_ptr(b_addr), ((k - 1) * ldb + n,))
    cf = numba.carray(_f32_ptr(c_addr), (m * n,))
    bias, has_bias, res, has_res = _epilogue_operands(c_addr, bias_addr, res_addr, m, n)
    blocks = (n + ROWS_NR - 1) // ROWS_NR
    if _use_threads(threads, m, n, k, serial, blocks):
        workers = min(threads, blocks)
        for w in prange(workers):
            b0 = w * blocks // workers
            b1 = (w + 1) * blocks // workers
            _rows_range(af, lda, bf, ldb, cf, m, n, k, b0, b1, bias, has_bias, res, has_res, act)
    else:
        _rows_range(af, lda, bf, ldb, cf, m, n, k, I0, blocks, bias, has_bias, res, has_res, act)


@njit(**JIT)
def _wrows_range(af, lda, wf, ldw, cf, m, n, k, j0, j1, bias, has_bias, res, has_res, act):
    """c[:, j0:j1] = a @ W[j0:j1].T for all m rows: eight weight rows at a time against
    WROWS_MR rows of a (``_dots_tile``), so each block of W is read from memory once and
    from L1 m / WROWS_MR times. A ragged last block of < 8 weight rows takes ``_dots``."""
    kv = k - k % VW
    for jb in range(j0, j1, 8):
        nj = min(8, j1 - jb)
        if nj < 8:
            for i in range(m):
                _dots(
                    af[i * lda : i * lda + k],
                    wf,
                    jb * ldw,
                    ldw,
                    nj,
                    k,
                    cf[i * n + jb : i * n + jb + nj],
                )
            continue
        r0 = jb * ldw
        i = 0
        # Four rows left go as 2 + 2, not 3 + 1: one row alone is bound by the loads.
        while m - i >= WROWS_MR and (WROWS_MR != 3 or m - i != 4):
            _dots_tile_max(af, i * lda, lda, wf, r0, ldw, kv, cf, i * n + jb, n)
            i += WROWS_MR
        while WROWS_MR > 2 and i + 2 <= m:
            _dots_tile2(af, i * lda, lda, wf, r0, ldw, kv, cf, i * n + jb, n)
            i += 2
        if i < m:
            _dots_tile1(af, i * lda, lda, wf, r0, ldw, kv, cf, i * n + jb, n)
        if kv < k:  # the K tail (< VW elements), added to the tiles' sums
            t = k - kv
            for i in range(m):
                ar = af[i * lda + kv : i * lda + k]
                crow = cf[i * n + jb : i * n + jb + 8]
                for j in range(8):
                    wr = wf[r0 + j * ldw + kv : r0 + j * ldw + k]
                    s = crow[j]
                    for p in range(t):
                        s += ar[p] * wr[p]
                    crow[j] = s
    if has_bias or has_res or act != 0:
        _epilogue(cf.reshape((m, n)), I0, m, j0, j1, bias, has_bias, res, has_res, act)


@njit(parallel=True, **JIT)
def _wrows_matmul(
    a_addr, lda, w_addr, ldw, c_addr, m, n, k, bias_addr, res_addr, act, threads, serial
):
    """c (m x n, new) = act(a (m x k) @ W.T + bias) + res with W (n x k) rows read in place.

    The ``b = W.t()`` layout of an ``nn.Linear`` weight; the threads split W's rows (whole
    8-row blocks), every thread runs all m rows of a on its own. One thread below ``serial``
    FMAs (``_use_threads``).
    """
    af = numba.carray(_f32_ptr(a_addr), ((m - 1) * lda + k,))
    wf = numba.carray(_f32_ptr(w_addr), ((n - 1) * ldw + k,))
    cf = numba.carray(_f32_ptr(c_addr), (m * n,))
    bias, has_bias, res, has_res = _epilogue_operands(c_addr, bias_addr, res_addr, m, n)
    blocks = (n + 7) // 8
    if _use_threads(threads, m, n, k, serial, blocks):
        workers = min(threads, blocks)
        for w in prange(workers):
            j0 = w * blocks // workers * 8
            j1 = min(n, (w + 1) * blocks // workers * 8)
            _wrows_range(af, lda, wf, ldw, cf, m, n, k, j0, j1, bias, has_bias, res, has_res, act)
    else:
        _wrows_range(af, lda, wf, ldw, cf, m, n, k, I0, n, bias, has_bias, res, has_res, act)


def _rows_call(a, b, m, k, n, bias, act, residual, serial: int) -> torch.Tensor:
    """The decode-size paths: ``a`` (m, k) with a unit column stride and ``b`` (k, n) with
    unit column stride (row tiles) or unit row stride (``b = W.t()``: weight rows), read in
    place; ``bias``/``residual`` contiguous float32 or None; a new (m, n) output. One thread
    below ``serial`` FMAs."""
    threads = set_threads()
    c = torch.empty(m, n, dtype=_F32)
    weight_rows = b.stride(1) != 1
    (_wrows_matmul if weight_rows else _rows_matmul)(
        a.data_ptr(),
        a.stride(0),
        b.data_ptr(),
        b.stride(1) if weight_rows else b.stride(0),
        c.data_ptr(),
        m,
        n,
        k,
        0 if bias is None else bias.data_ptr(),
        0 if residual is None else residual.data_ptr(),
        act,
        threads,
        serial,
    )
    return c


def _fast_epilogue(bias, activation, n: int) -> tuple[int, int] | None:
    """``(bias address or 0, activation code)`` when the decode-size fast path can apply
    them as given (no bias, or a contiguous float32 CPU ``(n,)`` bias; a known activation),
    else None: the full checks then convert, or raise naming the argument."""
    if activation is None:
        act = 0
    elif type(activation) is str and activation in ACT_CODES:
        act = ACT_CODES[activation]
    else:
        return None
    if bias is None:
        return 0, act
    try:
        ok = bias.dtype is _F32 and bias.is_cpu and bias.shape == (n,) and bias.stride(0) == 1
    except (AttributeError, TypeError):  # not a tensor (or 0-D): the full check raises
        return None
    return (bias.data_ptr(), act) if ok else None
