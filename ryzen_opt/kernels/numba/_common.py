"""Helpers shared by the Numba kernels: thread pool sizing, vectorizable math, dot micro-kernel.

Why the kernels look the way they do (measured on the 2-core dev VM, which exposes AVX2+FMA
only, no AVX-512, so LLVM targets 16 ymm registers):

* Numba ships with LLVM's SLP vectorizer off (``numba.config.SLP_VECTORIZE == 0``) and cannot
  keep a small accumulator array in registers, so the classic outer-product micro-kernel
  (broadcast A, FMA into an MR x NR register tile) compiles to scalar ``vfmadd231ss``: 2.5
  GFLOP/s on one core. The loop vectorizer does handle *reductions* well, so the micro-kernel
  here is a 3x3 block of dot products over the contiguous K axis: 9 ymm accumulators + 6
  loaded vectors = 15 of 16 ymm registers, 9 FMAs per 6 loads, no spills; 58 GFLOP/s on one
  core at K=256 vs 12 GFLOP/s for a 3x4 block (19 live vectors, 2 spilled every iteration).
* There is no SVML here (``numba -s``: SVML False), so ``math.exp`` stays a scalar libm call
  per element; :func:`_exp` is a polynomial with the 2**n scale built by a bit cast, which the
  loop vectorizer turns into 8-wide code.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# Every fast-math flag except nnan/ninf: masked scores are -inf and must compare as such.
FASTMATH = {"contract", "reassoc", "arcp", "nsz", "afn"}
# error_model="numpy": the default "python" model adds a divide-by-zero check with an
# exception path to every float division, which stops LLVM from vectorizing the loop.
JIT = {
    "fastmath": FASTMATH,
    "cache": True,
    "boundscheck": False,
    "nogil": True,
    "error_model": "numpy",
}
# Scalar math helpers are inlined at numba-IR level: left as calls, LLVM does not inline them
# across numba's per-function modules and the epilogue loop stays scalar (GELU epilogue of a
# 2048x2048 output: 160 ms called, vs a few ms inlined and vectorized).
INLINE = dict(JIT, inline="always")

ACT_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "relu": 4}
# Constants for one jitted function to pass to another. A Python constant there (0, False,
# an activation code) is typed as a literal, and Numba compiles the callee and its whole call
# tree once more for each such value: the float32 GPT-2 decoder step compiled `_gemv_rows`
# six times and took 52 s to compile on a cold cache (20 s after). Numpy scalars are plain
# int64/bool: one compiled copy serves every value. Write `np.int64(v)` for other values.
I0 = np.int64(0)
NO, YES = np.bool_(False), np.bool_(True)


_THREADS = threading.local()


def set_threads() -> int:
    """Give numba as many threads as torch uses (never more than its pool holds).

    Starting numba's OpenMP pool resets the process-wide OpenMP thread count, which torch
    reads: measured ``torch.get_num_threads()`` going 1 -> 2 on the first numba call. The
    caller's torch setting is restored, so numba never changes what torch runs with.
    The answer is remembered per Python thread (numba's count is per thread too) against
    torch's setting: ``numba.get_num_threads()`` alone costs 0.6 us, a decode call ~5 us.
    """
    want = torch.get_num_threads()
    if getattr(_THREADS, "want", None) == want:
        return _THREADS.n
    n = max(1, min(want, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    _THREADS.want, _THREADS.n = want, n
    return n


_SCRATCH = threading.local()


def scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 work array reused across calls on this thread (contents undefined).

    Packing buffers are megabytes; allocating them fresh each call costs first-touch page
    faults, which on the dev VM made (16, 4, 128, 64) attention 2x slower (15.9 vs 8.0 ms
    on one core). Per thread, so concurrent callers never share one. Holds the largest size
    seen (e.g. 16 MiB after a (1, 8, 4096, 64) attention).
    """
    n = int(np.prod(shape))
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.size < n:
        buf = np.empty(n, dtype=np.float32)
        setattr(_SCRATCH, name, buf)
    return buf[:n].reshape(shape)


def available() -> str | None:
    """``None``: numba imported (this module would not load otherwise)."""
    return None


def as_array(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor (shares memory)."""
    return t.detach().numpy()


def cpu_fp32_reason(name: str, t: torch.Tensor) -> str | None:
    if t.device.type != "cpu":
        return f"{name} is on {t.device}, numba kernels run on cpu"
    if t.dtype != torch.float32:
        return f"{name} is {t.dtype}, the numba kernels are float32 only"
    return None


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as float32 (trunc + bitcast: vectorizes)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return types.float32(x), codegen


@njit(**INLINE)
def _exp(x):
    """float32 exp, relative error < 2e-7 on [-87, 88]; 0 below -87 (masked scores are -inf).

    Range reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 Taylor polynomial of e**r
    (truncation 2e-8 at |r| = 0.347) times 2**n assembled in the exponent bits.
    """
    xc = min(max(x, np.float32(-87.0)), np.float32(88.0))
    # floor(t + 0.5) by truncating a positive number: math.floor is a scalar floorf call here.
    t = xc * np.float32(1.4426950408889634) + np.float32(128.5)
    ni = np.int32(t) - np.int32(128)
    n = np.float32(ni)
    r = xc - n * np.float32(0.693145751953125)
    r = r - n * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    scale = _bits_to_f32((ni + 127) << 23)
    return np.float32(0.0) if x < np.float32(-87.0) else p * scale


@njit(**INLINE)
def _erf(x):
    """erf with absolute error < 2e-7 (Abramowitz & Stegun 7.1.26 form, 5-term polynomial)."""
    ax = abs(x)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * ax)
    poly = np.float32(1.061405429)
    poly = poly * t + np.float32(-1.453152027)
    poly = poly * t + np.float32(1.421413741)
    poly = poly * t + np.float32(-0.284496736)
    poly = poly * t + np.float32(0.254829592)
    y = np.float32(1.0) - poly * t * _exp(-ax * ax)
    return y if x >= np.float32(0.0) else -y


@njit(**INLINE)
def _tanh(x):
    """tanh via exp of a non-positive argument (no overflow), odd extension."""
    e = _exp(np.float32(-2.0) * abs(x))
    y = (np.float32(1.0) - e) / (np.float32(1.0) + e)
    return y if x >= np.float32(0.0) else -y


# Below this GELU and SiLU are -0.0 in fp32 (|x| * e**x < 1e-36; torch gives -0.0 from -88
# on). The select keeps x = -inf at its limit -0.0: computed, it is -inf * 0 = NaN (GELU) or
# -inf / e**88 = -inf (SiLU, whose exp is clamped to stay finite).
_ACT_LOW = np.float32(-88.0)


@njit(**INLINE)
def _activate(v, act):
    """Epilogue activation by code (ACT_CODES); the branch is loop-invariant at call sites."""
    if act == 1:
        y = np.float32(0.5) * v * (np.float32(1.0) + _erf(v * np.float32(0.7071067811865476)))
        return np.float32(-0.0) if v < _ACT_LOW else y
    if act == 2:
        u = np.float32(0.7978845608028654) * (v + np.float32(0.044715) * v * v * v)
        y = np.float32(0.5) * v * (np.float32(1.0) + _tanh(u))
        return np.float32(-0.0) if v < _ACT_LOW else y
    if act == 3:
        y = v / (np.float32(1.0) + _exp(-v))
        return np.float32(-0.0) if v < _ACT_LOW else y
    if act == 4:
        return max(v, np.float32(0.0))
    return v


@njit(**JIT)
def _dot3x3(a0, a1, a2, b0, b1, b2, n):
    """The 3x3 block of dot products a_r[:n] . b_c[:n] (see the module docstring for why)."""
    s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = np.float32(0.0)
    for p in range(n):
        x0 = a0[p]
        x1 = a1[p]
        x2 = a2[p]
        y0 = b0[p]
        y1 = b1[p]
        y2 = b2[p]
        s00 += x0 * y0
        s01 += x0 * y1
        s02 += x0 * y2
        s10 += x1 * y0
        s11 += x1 * y1
        s12 += x1 * y2
        s20 += x2 * y0
        s21 += x2 * y1
        s22 += x2 * y2
    return s00, s01, s02, s10, s11, s12, s20, s21, s22


@njit(**INLINE)
def _dot1x4(a0, b0, b1, b2, b3, n):
    """One row against four: the skinny (M = 1, 2) case, bound by streaming b."""
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for p in range(n):
        x = a0[p]
        s0 += x * b0[p]
        s1 += x * b1[p]
        s2 += x * b2[p]
        s3 += x * b3[p]
    return s0, s1, s2, s3


def _host_vector_width() -> int:
    """float32 lanes of the widest vector the compile target has: 16 with AVX-512F, else 8.

    Read from numba's target (``NUMBA_CPU_FEATURES`` when set, else the host), never assumed:
    the same source runs on AVX2-only and AVX-512 machines. Either width gives the same
    results; only the register tiling depends on it.
    """
    import llvmlite.binding as ll

    feats = numba.config.CPU_FEATURES
    if feats:
        return 16 if "+avx512f" in feats.split(",") else 8
    if numba.config.CPU_NAME:  # a named target without a feature list: stay portable
        return 8
    return 16 if ll.get_host_cpu_features().get("avx512f", False) else 8


VW = _host_vector_width()


# Register tiles: MR = 6 rows x 2 vectors of columns. With AVX2 (8 lanes) 6 x 16 = 12 ymm
# accumulators + 2 B vectors + 1 broadcast = 15 of 16 registers: 101 GFLOP/s on one core at
# KC=256, against 58 for the 3x3 dot kernel (which needs no packing and stays in use for
# skinny M). The packed GEMM tile (_fma_tile: matmul, attention) is GEMM_NR = 2 vectors wide
# at the target's width: with AVX-512 the 6 x 32 tile in zmm registers (15 of 32) ran 189
# GFLOP/s on one core of a 2-core Xeon against 130 for the 6 x 16 ymm tile (a one-off loop
# of 256-step tiles; 8 x 32: 213, but no faster in whole matmuls). The rows tile
# (_fma_rows_tile: decode steps, LoRA) stays NR = 16 wide: its columns are token rows, 1-16
# at decode, and a 32-wide tile would compute zero rows (the LoRA expansion of 16 rows at
# 2048 x 2048 ran 28.7 against 38.5 GFLOP/s at 32 wide).
MR = 6
NR = 16
GEMM_NR = 2 * VW


def _emit_fma_tile(builder, a_ptr, a_index, b_ptr, c_ptr, n, nr: int, vw: int, b_ld=None) -> None:
    """IR of the MR x nr register tile: c[i*nr + j] = sum_k a[a_index(k, i)] * b[k*ldb + j],
    in ``vw``-lane vectors.

    ``a_index(builder, k, i)`` gives the (i64) element index of A's row i at step k, so the
    same loop serves a packed k-major panel and rows read in place with a stride. ``b_ld``
    (an i64 value) is B's row stride; ``None``: ``nr``, a packed panel.
    """
    NR, VW = nr, vw  # noqa: N806 (the tile's width and vector lanes, as in the IR below)
    f32, i64 = ir.FloatType(), ir.IntType(64)
    vec = ir.VectorType(f32, VW)
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{VW}f32"
    )
    zero = ir.Constant(vec, None)
    lanes0 = ir.Constant(ir.VectorType(ir.IntType(32), VW), [0] * VW)
    entry = builder.block
    loop = builder.append_basic_block("tile_loop")
    done = builder.append_basic_block("tile_done")
    builder.cbranch(builder.icmp_signed(">", n, ir.Constant(i64, 0)), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(i64)
    k.add_incoming(ir.Constant(i64, 0), entry)
    accs = []
    for _ in range(MR * NR // VW):
        p = builder.phi(vec)
        p.add_incoming(zero, entry)
        accs.append(p)
    b_off = builder.mul(k, ir.Constant(i64, NR) if b_ld is None else b_ld)
    bv = []
    for h in range(NR // VW):
        ptr = builder.gep(b_ptr, [builder.add(b_off, ir.Constant(i64, VW * h))])
        bv.append(builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4))
    new = []
    for i in range(MR):
        a = builder.load(builder.gep(a_ptr, [a_index(builder, k, i)]))
        one = builder.insert_element(
            ir.Constant(vec, ir.Undefined), a, ir.Constant(ir.IntType(32), 0)
        )
        splat = builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), lanes0)
        for h in range(NR // VW):
            new.append(builder.call(fma, [splat, bv[h], accs[i * (NR // VW) + h]]))
    k1 = builder.add(k, ir.Constant(i64, 1))
    tail = builder.block
    k.add_incoming(k1, tail)
    for p, v in zip(accs, new, strict=True):
        p.add_incoming(v, tail)
    builder.cbranch(builder.icmp_signed("<", k1, n), loop, done)
    builder.position_at_end(done)
    outs = []
    for j in range(MR * NR // VW):
        r = builder.phi(vec)
        r.add_incoming(zero, entry)
        r.add_incoming(new[j], tail)
        outs.append(r)
    for j, r in enumerate(outs):
        ptr = builder.gep(c_ptr, [ir.Constant(i64, VW * j)])
        builder.store(r, builder.bitcast(ptr, vec.as_pointer()), align=4)


def _as_i64(builder, v):
    return builder.sext(v, ir.IntType(64)) if v.type.width < 64 else v


def _f32_arrays(*ts) -> bool:
    return all(isinstance(t, types.Array) and t.dtype == types.float32 for t in ts)


@intrinsic
def _fma_tile(typingctx, ap, bp, kc, acc):
    """acc[:MR*GEMM_NR] = sum over k < kc of outer(ap[k*MR:(k+1)*MR], bp[k*GEMM_NR:(k+1)*GEMM_NR]).

    Written as LLVM IR because numba cannot express it: the loop vectorizer never keeps an
    accumulator tile in registers and the SLP vectorizer is off, so the same loop in Python
    compiles to scalar FMAs (2.5 GFLOP/s). Here the 12 accumulators are vector phi nodes of
    the target's width (``VW`` lanes: <8 x float> with AVX2, <16 x float> with AVX-512) and
    every update is one ``llvm.fma``. ``ap``/``bp`` are packed panels (k-major), ``acc`` a
    contiguous float32 buffer of MR*GEMM_NR.
    """
    if not (isinstance(kc, types.Integer) and _f32_arrays(ap, bp, acc)):
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        a_ptr = context.make_array(sig.args[0])(context, builder, args[0]).data
        b_ptr = context.make_array(sig.args[1])(context, builder, args[1]).data
        c_ptr = context.make_array(sig.args[3])(context, builder, args[3]).data

        def a_index(b, k, i):
            return b.add(b.mul(k, ir.Constant(i64, MR)), ir.Constant(i64, i))

        n = _as_i64(builder, args[2])
        _emit_fma_tile(builder, a_ptr, a_index, b_ptr, c_ptr, n, GEMM_NR, VW)
        return context.get_dummy_value()

    return types.void(ap, bp, kc, acc), codegen


def _make_fma_rows_tile(nr: int, vw: int):
    """The ``fma_rows_tile`` intrinsic for an MR x ``nr`` tile in ``vw``-lane vectors."""

    @intrinsic
    def fma_rows_tile(typingctx, a, a0, lda, bp, kc, acc):
        if not (
            isinstance(a0, types.Integer)
            and isinstance(lda, types.Integer)
            and isinstance(kc, types.Integer)
            and _f32_arrays(a, bp, acc)
        ):
            return None

        def codegen(context, builder, sig, args):
            a_ptr = context.make_array(sig.args[0])(context, builder, args[0]).data
            b_ptr = context.make_array(sig.args[3])(context, builder, args[3]).data
            c_ptr = context.make_array(sig.args[5])(context, builder, args[5]).data
            start, stride = _as_i64(builder, args[1]), _as_i64(builder, args[2])
            rows = [
                builder.add(start, builder.mul(stride, ir.Constant(stride.type, i)))
                for i in range(MR)
            ]

            def a_index(b, k, i):
                return b.add(rows[i], k)

            n = _as_i64(builder, args[4])
            _emit_fma_tile(builder, a_ptr, a_index, b_ptr, c_ptr, n, nr, vw)
            return context.get_dummy_value()

        return types.void(a, a0, lda, bp, kc, acc), codegen

    return fma_rows_tile


_fma_rows_tile = _make_fma_rows_tile(NR, 8)  # ymm, 16 wide: token rows (decode, LoRA)
_fma_rows_tile.__doc__ = """acc[i*NR + j] = sum over k < kc of a[a0 + i*lda + k] * bp[k*NR + j],
    i < MR, j < NR.

    The :func:`_fma_tile` register tile with A's MR rows read in place (row stride ``lda``
    from element ``a0`` of the flat array ``a``) instead of from a packed panel: for
    ``W @ X^T`` with ``W`` an unpacked weight matrix (six rows streamed side by side) and
    ``X^T`` a small packed activation panel, which is how a decode step multiplies a few
    token rows by weights it must not copy.
    """
# The same, GEMM_NR wide at the target's width: A's rows read in place against a packed
# GEMM panel (attention's Q K^T: the query rows in place).
_fma_rows_gemm_tile = _make_fma_rows_tile(GEMM_NR, VW)


@intrinsic
def _fma_rows_strided_tile(typingctx, a, a0, lda, b, b0, ldb, kc, acc):
    """acc[i*GEMM_NR + j] = sum over k < kc of a[a0 + i*lda + k] * b[b0 + k*ldb + j], i < MR,
    j < GEMM_NR: both operands read in place, A's MR rows and B's kc rows of GEMM_NR
    columns each with its own row stride (attention's P V: the probability rows straight from
    the score tile against V's rows as stored, no packed copy of V).
    """
    if not (
        all(isinstance(x, types.Integer) for x in (a0, lda, b0, ldb, kc)) and _f32_arrays(a, b, acc)
    ):
        return None

    def codegen(context, builder, sig, args):
        a_ptr = context.make_array(sig.args[0])(context, builder, args[0]).data
        b_arr = context.make_array(sig.args[3])(context, builder, args[3]).data
        c_ptr = context.make_array(sig.args[7])(context, builder, args[7]).data
        start, stride = _as_i64(builder, args[1]), _as_i64(builder, args[2])
        rows = [
            builder.add(start, builder.mul(stride, ir.Constant(stride.type, i))) for i in range(MR)
        ]

        def a_index(bld, k, i):
            return bld.add(rows[i], k)

        b_ptr = builder.gep(b_arr, [_as_i64(builder, args[4])])
        n = _as_i64(builder, args[6])
        _emit_fma_tile(
            builder, a_ptr, a_index, b_ptr, c_ptr, n, GEMM_NR, VW, _as_i64(builder, args[5])
        )
        return context.get_dummy_value()

    return types.void(a, a0, lda, b, b0, ldb, kc, acc), codegen


def _pointer_intrinsic(elem: types.Type, llvm_elem: ir.Type, doc: str):
    @intrinsic
    def at(typingctx, addr):
        if not isinstance(addr, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], ir.PointerType(llvm_elem))

        return types.CPointer(elem)(addr), codegen

    at.__doc__ = doc
    return at


# Typed pointers from integer addresses (``Tensor.data_ptr()``), for ``numba.carray``: a
# launcher passes a tensor as its address and strides (~0.08 us) instead of a numpy view
# (``t.detach().numpy()``: ~0.9 us each, measured), which matters for microsecond decode ops.
_f32_ptr = _pointer_intrinsic(types.float32, ir.FloatType(), "float32 pointer at an address.")
_i64_ptr = _pointer_intrinsic(types.int64, ir.IntType(64), "int64 pointer at an address.")
_i32_ptr = _pointer_intrinsic(types.int32, ir.IntType(32), "int32 pointer at an address.")


def _f32_data(context, builder, arr_type, arr):
    return context.make_array(arr_type)(context, builder, arr).data


def _load_v8(builder, base, index, vw=8):
    vec = ir.VectorType(ir.FloatType(), vw)
    return builder.load(builder.bitcast(builder.gep(base, [index]), vec.as_pointer()), align=4)


def _counted_loop(builder, n, step, body, carried):
    """``for i in range(0, n, step)`` with loop-carried values: ``body(i, vals) -> vals``.

    Returns the carried values after the loop (their initial values if it never ran).
    """
    i64 = ir.IntType(64)
    entry = builder.block
    loop = builder.append_basic_block("loop")
    done = builder.append_basic_block("loop_done")
    builder.cbranch(builder.icmp_signed(">", n, ir.Constant(i64, 0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(i64)
    i.add_incoming(ir.Constant(i64, 0), entry)
    phis = []
    for v in carried:
        p = builder.phi(v.type)
        p.add_incoming(v, entry)
        phis.append(p)
    new = body(i, phis)
    i1 = builder.add(i, ir.Constant(i64, step))
    tail = builder.block
    i.add_incoming(i1, tail)
    for p, v in zip(phis, new, strict=True):
        p.add_incoming(v, tail)
    builder.cbranch(builder.icmp_signed("<", i1, n), loop, done)
    builder.position_at_end(done)
    out = []
    for v0, v in zip(carried, new, strict=True):
        r = builder.phi(v.type)
        r.add_incoming(v0, entry)
        r.add_incoming(v, tail)
        out.append(r)
    return out


def _hsum8x8(builder, accs):
    """8 vectors of 8 -> one vector whose lane i is the sum of accs[i] (a transpose-add tree:
    7 x 2 shuffles + 7 adds, instead of 8 separate horizontal sums)."""
    i32 = ir.IntType(32)

    def pairs(a, b, lo, hi):
        m_lo = ir.Constant(ir.VectorType(i32, 8), lo)
        m_hi = ir.Constant(ir.VectorType(i32, 8), hi)
        return builder.fadd(builder.shuffle_vector(a, b, m_lo), builder.shuffle_vector(a, b, m_hi))

    t = [
        pairs(accs[i], accs[i + 1], [0, 8, 2, 10, 4, 12, 6, 14], [1, 9, 3, 11, 5, 13, 7, 15])
        for i in range(0, 8, 2)
    ]
    u = [
        pairs(t[i], t[i + 1], [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])
        for i in (0, 2)
    ]
    return pairs(u[0], u[1], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])


def _make_dots8(vw: int):
    """The ``dots8`` intrinsic at ``vw`` lanes (see ``_dots8``)."""

    @intrinsic
    def dots8(typingctx, x, x0, rows, r0, ldr, n, out, o0):
        ints = (x0, r0, ldr, n, o0)
        if not (all(isinstance(v, types.Integer) for v in ints) and _f32_arrays(x, rows, out)):
            return None

        def codegen(context, builder, sig, args):
            i64, i32 = ir.IntType(64), ir.IntType(32)
            vec = ir.VectorType(ir.FloatType(), vw)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{vw}f32"
            )
            xp = _f32_data(context, builder, sig.args[0], args[0])
            rp = _f32_data(context, builder, sig.args[2], args[2])
            op = _f32_data(context, builder, sig.args[6], args[6])
            xs, rs, ld, n_, os_ = (_as_i64(builder, args[i]) for i in (1, 3, 4, 5, 7))
            starts = [builder.add(rs, builder.mul(ld, ir.Constant(i64, i))) for i in range(8)]

            def body(p, accs):
                xv = _load_v8(builder, xp, builder.add(xs, p), vw)
                return [
                    builder.call(fma, [_load_v8(builder, rp, builder.add(s, p), vw), xv, a])
                    for s, a in zip(starts, accs, strict=True)
                ]

            accs = _counted_loop(builder, n_, vw, body, [ir.Constant(vec, None)] * 8)
            if vw == 16:  # fold each 16-lane sum to 8 lanes first
                lo = ir.Constant(ir.VectorType(i32, 8), list(range(8)))
                hi = ir.Constant(ir.VectorType(i32, 8), list(range(8, 16)))
                accs = [
                    builder.fadd(builder.shuffle_vector(a, a, lo), builder.shuffle_vector(a, a, hi))
                    for a in accs
                ]
            total = _hsum8x8(builder, accs)
            v8 = ir.VectorType(ir.FloatType(), 8)
            builder.store(total, builder.bitcast(builder.gep(op, [os_]), v8.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(x, x0, rows, r0, ldr, n, out, o0), codegen

    dots8.__doc__ = _DOTS8_DOC
    return dots8


_DOTS8_DOC = """out[o0 + i] = sum over p < n of x[x0 + p] * rows[r0 + i*ldr + p], for i < 8.

    Eight dot products against one vector (scores of eight keys against a query, or eight
    weight rows against an activation row). ``n`` must be a multiple of the vector width:
    the caller adds the tail. Each step loads one x vector and eight row vectors into eight
    independent FMA chains; the eight sums leave through one transpose-add tree and one
    vector store, not eight horizontal sums.
    """
_dots8 = _make_dots8(VW)


def _make_axpy_rows(width: int, vw: int = 8, pair: bool = False):
    """The ``axpy_rows`` intrinsic for a block of ``width`` vectors of ``vw`` columns.

    ``pair``: rows go two at a time into two accumulator sets (summed at the end), which
    doubles the independent FMA chains; ``n`` must then be even.
    """

    @intrinsic
    def axpy_rows(typingctx, w, w0, rows, r0, ldr, n, acc, a0):
        ints = (w0, r0, ldr, n, a0)
        if not (all(isinstance(v, types.Integer) for v in ints) and _f32_arrays(w, rows, acc)):
            return None

        def codegen(context, builder, sig, args):
            i64 = ir.IntType(64)
            vec = ir.VectorType(ir.FloatType(), vw)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{vw}f32"
            )
            wp = _f32_data(context, builder, sig.args[0], args[0])
            rp = _f32_data(context, builder, sig.args[2], args[2])
            ap = _f32_data(context, builder, sig.args[6], args[6])
            ws, rs, ld, n_, as_ = (_as_i64(builder, args[i]) for i in (1, 3, 4, 5, 7))
            slots = [builder.add(as_, ir.Constant(i64, vw * h)) for h in range(width)]
            init = [_load_v8(builder, ap, s, vw) for s in slots]
            if pair:
                init += [ir.Constant(vec, None)] * width
            lanes0 = ir.Constant(ir.VectorType(ir.IntType(32), vw), [0] * vw)

            def row_update(i, accs):
                wi = builder.load(builder.gep(wp, [builder.add(ws, i)]))
                one = builder.insert_element(
                    ir.Constant(vec, ir.Undefined), wi, ir.Constant(ir.IntType(32), 0)
                )
                splat = builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), lanes0)
                row = builder.add(rs, builder.mul(i, ld))
                loads = [
                    _load_v8(builder, rp, builder.add(row, ir.Constant(i64, vw * h)), vw)
                    for h in range(width)
                ]
                return [builder.call(fma, [splat, x, a]) for x, a in zip(loads, accs, strict=True)]

            def body(i, accs):
                if not pair:
                    return row_update(i, accs)
                first = row_update(i, accs[:width])
                second = row_update(builder.add(i, ir.Constant(i64, 1)), accs[width:])
                return first + second

            accs = _counted_loop(builder, n_, 2 if pair else 1, body, init)
            if pair:
                accs = [builder.fadd(x, y) for x, y in zip(accs[:width], accs[width:], strict=True)]
            for s, a in zip(slots, accs, strict=True):
                builder.store(a, builder.bitcast(builder.gep(ap, [s]), vec.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(w, w0, rows, r0, ldr, n, acc, a0), codegen

    axpy_rows.__doc__ = (
        f"acc[a0 : a0 + {vw * width}] += sum over i < n of w[w0 + i] * "
        f"rows[r0 + i*ldr : r0 + i*ldr + {vw * width}]: the accumulator stays in registers "
        "over all n rows (one broadcast and one load + FMA per vector a row)."
    )
    return axpy_rows


# 64 columns a block: 8 ymm accumulators (8 FMA chains: the 4-cycle latency of two ports),
# or 4 zmm taken two rows at a time (8 chains again); a single 8-wide vector for what is left.
_axpy_rows64 = _make_axpy_rows(64 // VW, VW, pair=VW == 16)
_axpy_rows64_one = _make_axpy_rows(64 // VW, VW)
_axpy_rows1 = _make_axpy_rows(1)


@njit(**JIT)
def _dots(x, rows, r0, ldr, m, n, out):
    """out[i] = x[:n] . rows[r0 + i*ldr : r0 + i*ldr + n] for i < m (eight rows at a time)."""
    n8 = n - n % VW
    i = 0
    while i + 8 <= m:
        _dots8(x, 0, rows, r0 + i * ldr, ldr, n8, out, i)
        i += 8
    while i < m:
        o = r0 + i * ldr
        r = rows[o : o + n8]
        s = np.float32(0.0)
        for p in range(n8):
            s += x[p] * r[p]
        out[i] = s
        i += 1
    if n8 < n:
        for i in range(m):
            o = r0 + i * ldr
            s = out[i]
            for p in range(n8, n):
                s += x[p] * rows[o + p]
            out[i] = s


@njit(**JIT)
def _axpys(w, rows, r0, ldr, m, n, acc):
    """acc[:n] += sum over i < m of w[i] * rows[r0 + i*ldr : r0 + i*ldr + n]."""
    c = 0
    m2 = m - m % 2 if VW == 16 else m
    while c + 64 <= n:
        _axpy_rows64(w, 0, rows, r0 + c, ldr, m2, acc, c)
        if m2 < m:
            _axpy_rows64_one(w, m2, rows, r0 + m2 * ldr + c, ldr, 1, acc, c)
        c += 64
    while c + 8 <= n:
        _axpy_rows1(w, 0, rows, r0 + c, ldr, m, acc, c)
        c += 8
    if c < n:
        for i in range(m):
            o = r0 + i * ldr
            wi = w[i]
            for e in range(c, n):
                acc[e] += wi * rows[o + e]


@intrinsic
def _max8(typingctx, x, x0, n):
    """max of x[x0 : x0 + n] (n a multiple of 8; -inf when n == 0), with vector maxima.

    The plain loop ``m = max(m, x[i])`` stays scalar under fast-math without ``nnan`` (the
    loop vectorizer needs it for a compare-and-select reduction): a 4-cycle dependency per
    element, 1.3 ns a key of decode attention's softmax, measured.
    """
    if not (isinstance(x0, types.Integer) and isinstance(n, types.Integer) and _f32_arrays(x)):
        return None

    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        vec = ir.VectorType(f32, 8)
        vmax = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec, vec]), "llvm.maxnum.v8f32"
        )
        xp = _f32_data(context, builder, sig.args[0], args[0])
        xs, n_ = _as_i64(builder, args[1]), _as_i64(builder, args[2])
        ninf = ir.Constant(vec, [float("-inf")] * 8)

        def body(p, accs):
            return [builder.call(vmax, [_load_v8(builder, xp, builder.add(xs, p)), accs[0]])]

        (m,) = _counted_loop(builder, n_, 8, body, [ninf])
        best = builder.extract_element(m, ir.Constant(ir.IntType(32), 0))
        for i in range(1, 8):
            e = builder.extract_element(m, ir.Constant(ir.IntType(32), i))
            best = builder.select(builder.fcmp_ordered(">", e, best), e, best)
        return best

    return types.float32(x, x0, n), codegen


def _make_rows_tile(mr: int, nv: int, vw: int):
    """The intrinsic ``tile(a, a0, lda, b, b0, ldb, k, c, c0, ldc)``:

    c[c0 + i*ldc + j] = sum over p < k of a[a0 + i*lda + p] * b[b0 + p*ldb + j]
    for i < mr, j < nv*vw: an mr x nv*vw register tile of ``A @ B`` with A's rows and B's
    rows read in place (row-major, any leading dims), the full K reduced in registers and
    stored once. Per step: mr broadcasts of A, nv loads of one B row, mr*nv FMAs.
    """

    @intrinsic
    def tile(typingctx, a, a0, lda, b, b0, ldb, k, c, c0, ldc):
        ints = (a0, lda, b0, ldb, k, c0, ldc)
        if not (all(isinstance(v, types.Integer) for v in ints) and _f32_arrays(a, b, c)):
            return None

        def codegen(context, builder, sig, args):
            i64, i32 = ir.IntType(64), ir.IntType(32)
            vec = ir.VectorType(ir.FloatType(), vw)
            vptr = vec.as_pointer()
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{vw}f32"
            )
            ap = _f32_data(context, builder, sig.args[0], args[0])
            bp = _f32_data(context, builder, sig.args[3], args[3])
            cp = _f32_data(context, builder, sig.args[7], args[7])
            a_0, a_ld, b_0, b_ld, k_, c_0, c_ld = (
                _as_i64(builder, args[i]) for i in (1, 2, 4, 5, 6, 8, 9)
            )
            rows = [builder.add(a_0, builder.mul(a_ld, ir.Constant(i64, i))) for i in range(mr)]
            lanes0 = ir.Constant(ir.VectorType(i32, vw), [0] * vw)

            def body(p, accs):
                brow = builder.add(b_0, builder.mul(p, b_ld))
                bv = [
                    builder.load(
                        builder.bitcast(
                            builder.gep(bp, [builder.add(brow, ir.Constant(i64, vw * h))]), vptr
                        ),
                        align=4,
                    )
                    for h in range(nv)
                ]
                new = []
                for i in range(mr):
                    x = builder.load(builder.gep(ap, [builder.add(rows[i], p)]))
                    one = builder.insert_element(
                        ir.Constant(vec, ir.Undefined), x, ir.Constant(i32, 0)
                    )
                    splat = builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), lanes0)
                    for h in range(nv):
                        new.append(builder.call(fma, [splat, bv[h], accs[i * nv + h]]))
                return new

            accs = _counted_loop(builder, k_, 1, body, [ir.Constant(vec, None)] * (mr * nv))
            for i in range(mr):
                crow = builder.add(c_0, builder.mul(c_ld, ir.Constant(i64, i)))
                for h in range(nv):
                    dst = builder.gep(cp, [builder.add(crow, ir.Constant(i64, vw * h))])
                    builder.store(accs[i * nv + h], builder.bitcast(dst, vptr), align=4)
            return context.get_dummy_value()

        return types.void(a, a0, lda, b, b0, ldb, k, c, c0, ldc), codegen

    tile.__doc__ = f"{mr} x {nv * vw} register tile of A @ B (see _make_rows_tile)."
    return tile


# Skinny-M tiles: NR = 6 vectors of columns, rows in tiles of 4/2/1 (AVX-512: 24 of 32 zmm
# registers hold accumulators at 4 rows) or 2/1 (AVX2: 12 of 16 ymm). Six vectors a row keep
# six FMA chains in flight even for one row (a decode GEMV): with three, 1 x 256 x 768 was
# bound by the 4-cycle FMA latency.
ROWS_NV = 6
ROWS_NR = ROWS_NV * VW
ROWS_MR = 4 if VW == 16 else 2
_rows_tile_max = _make_rows_tile(ROWS_MR, ROWS_NV, VW)
_rows_tile2 = _make_rows_tile(2, ROWS_NV, VW)
_rows_tile1 = _make_rows_tile(1, ROWS_NV, VW)
# The whole vectors of a ragged last panel (N not a multiple of ROWS_NR) two and one vectors
# wide: an axpy loop over B's rows there (the output row stored back every step) made the
# last 64 of 256 columns cost twice the other 192 at 16 x 256 x 256 (see NOTES.md).
_rows_tile_max_v2 = _make_rows_tile(ROWS_MR, 2, VW)
_rows_tile2_v2 = _make_rows_tile(2, 2, VW)
_rows_tile1_v2 = _make_rows_tile(1, 2, VW)
_rows_tile_max_v1 = _make_rows_tile(ROWS_MR, 1, VW)
_rows_tile2_v1 = _make_rows_tile(2, 1, VW)
_rows_tile1_v1 = _make_rows_tile(1, 1, VW)
