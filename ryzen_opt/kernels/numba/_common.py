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


def set_threads() -> int:
    """Give numba as many threads as torch uses (never more than its pool holds).

    Starting numba's OpenMP pool resets the process-wide OpenMP thread count, which torch
    reads: measured ``torch.get_num_threads()`` going 1 -> 2 on the first numba call. The
    caller's torch setting is restored, so numba never changes what torch runs with.
    """
    want = torch.get_num_threads()
    n = max(1, min(want, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
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


# Register tile of the packed GEMM micro-kernel: 6 rows x 16 columns = 12 ymm accumulators +
# 2 B vectors + 1 broadcast = 15 of 16 registers; 101 GFLOP/s on one core at KC=256, against
# 58 for the 3x3 dot kernel (which needs no packing and stays in use for skinny M).
MR = 6
NR = 16


def _emit_fma_tile(builder, a_ptr, a_index, b_ptr, c_ptr, n) -> None:
    """IR of the MR x NR register tile: c[i*NR + j] = sum_k a[a_index(k, i)] * b[k*NR + j].

    ``a_index(builder, k, i)`` gives the (i64) element index of A's row i at step k, so the
    same loop serves a packed k-major panel and rows read in place with a stride.
    """
    f32, i64 = ir.FloatType(), ir.IntType(64)
    vec = ir.VectorType(f32, 8)
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v8f32"
    )
    zero = ir.Constant(vec, None)
    lanes0 = ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8)
    entry = builder.block
    loop = builder.append_basic_block("tile_loop")
    done = builder.append_basic_block("tile_done")
    builder.cbranch(builder.icmp_signed(">", n, ir.Constant(i64, 0)), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(i64)
    k.add_incoming(ir.Constant(i64, 0), entry)
    accs = []
    for _ in range(MR * NR // 8):
        p = builder.phi(vec)
        p.add_incoming(zero, entry)
        accs.append(p)
    b_off = builder.mul(k, ir.Constant(i64, NR))
    bv = []
    for h in range(NR // 8):
        ptr = builder.gep(b_ptr, [builder.add(b_off, ir.Constant(i64, 8 * h))])
        bv.append(builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4))
    new = []
    for i in range(MR):
        a = builder.load(builder.gep(a_ptr, [a_index(builder, k, i)]))
        one = builder.insert_element(
            ir.Constant(vec, ir.Undefined), a, ir.Constant(ir.IntType(32), 0)
        )
        splat = builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), lanes0)
        for h in range(NR // 8):
            new.append(builder.call(fma, [splat, bv[h], accs[i * (NR // 8) + h]]))
    k1 = builder.add(k, ir.Constant(i64, 1))
    tail = builder.block
    k.add_incoming(k1, tail)
    for p, v in zip(accs, new, strict=True):
        p.add_incoming(v, tail)
    builder.cbranch(builder.icmp_signed("<", k1, n), loop, done)
    builder.position_at_end(done)
    outs = []
    for j in range(MR * NR // 8):
        r = builder.phi(vec)
        r.add_incoming(zero, entry)
        r.add_incoming(new[j], tail)
        outs.append(r)
    for j, r in enumerate(outs):
        ptr = builder.gep(c_ptr, [ir.Constant(i64, 8 * j)])
        builder.store(r, builder.bitcast(ptr, vec.as_pointer()), align=4)


def _as_i64(builder, v):
    return builder.sext(v, ir.IntType(64)) if v.type.width < 64 else v


def _f32_arrays(*ts) -> bool:
    return all(isinstance(t, types.Array) and t.dtype == types.float32 for t in ts)


@intrinsic
def _fma_tile(typingctx, ap, bp, kc, acc):
    """acc[:MR*NR] = sum over k < kc of outer(ap[k*MR:(k+1)*MR], bp[k*NR:(k+1)*NR]).

    Written as LLVM IR because numba cannot express it: the loop vectorizer never keeps an
    accumulator tile in registers and the SLP vectorizer is off, so the same loop in Python
    compiles to scalar FMAs (2.5 GFLOP/s). Here the 12 accumulators are <8 x float> phi nodes
    and every update is one llvm.fma.v8f32. ``ap``/``bp`` are packed panels (k-major),
    ``acc`` a contiguous float32 buffer of MR*NR.
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

        _emit_fma_tile(builder, a_ptr, a_index, b_ptr, c_ptr, _as_i64(builder, args[2]))
        return context.get_dummy_value()

    return types.void(ap, bp, kc, acc), codegen


@intrinsic
def _fma_rows_tile(typingctx, a, a0, lda, bp, kc, acc):
    """acc[i*NR + j] = sum over k < kc of a[a0 + i*lda + k] * bp[k*NR + j], i < MR, j < NR.

    The :func:`_fma_tile` register tile with A's MR rows read in place (row stride ``lda``
    from element ``a0`` of the flat array ``a``) instead of from a packed panel: for
    ``W @ X^T`` with ``W`` an unpacked weight matrix (six rows streamed side by side) and
    ``X^T`` a small packed activation panel, which is how a decode step multiplies a few
    token rows by weights it must not copy.
    """
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
            builder.add(start, builder.mul(stride, ir.Constant(stride.type, i))) for i in range(MR)
        ]

        def a_index(b, k, i):
            return b.add(rows[i], k)

        _emit_fma_tile(builder, a_ptr, a_index, b_ptr, c_ptr, _as_i64(builder, args[4]))
        return context.get_dummy_value()

    return types.void(a, a0, lda, bp, kc, acc), codegen
