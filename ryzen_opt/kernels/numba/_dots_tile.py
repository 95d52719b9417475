"""Register tiles of dot products for ``a @ W.T`` with both operands' rows contiguous.

The ``nn.Linear`` layout at decode sizes: ``a`` (M < 24, K) and ``W`` (N, K), both read in
place. ``_common._dots8`` runs one row of ``a`` against eight rows of ``W``: per step one
load of ``a``, eight of ``W`` and eight FMAs, so it is bound by the loads (9 per 8 FMAs)
and 16 x 256 x 768 ran at half the rate of the (K, N) row tiles (one core of a Zen 4 EPYC:
113.9 vs 59.4 us, see NOTES.md). The tile here takes ``mr`` rows of ``a`` at once against the
same eight ``W`` rows: 8*mr accumulators, mr + 8 loads per 8*mr FMAs (3 rows: 11 loads per
24 FMAs, 24 + 3 + 1 of the 32 zmm registers). With AVX2 (16 ymm) only ``mr = 1`` fits
(8 + 1 + 1), which is ``_dots8`` again.

Each row's eight sums leave through a transpose-add tree (``_sum8``) and one 8-lane store:
3 stages of two shuffles and an add for 8 accumulators (plus a fold with 16 lanes), about 3
vector ops per output against 16 FMAs per output at K = 256.

The caching caveat of NOTES.md holds here too: a kernel in ``matmul.py`` that inlines these
intrinsics is not recompiled when this file changes; delete ``__pycache__/*.nb*``.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ryzen_opt.kernels.numba._common import (
    VW,
    _as_i64,
    _counted_loop,
    _f32_arrays,
    _f32_data,
    _load_v8,
)


def _sum8(builder, accs, vw: int):
    """8 vectors of ``vw`` lanes -> one 8-lane vector whose lane j is the sum of accs[j].

    Each stage pairs two vectors holding g groups of L lanes (one group per accumulator) into
    one holding 2g groups of L/2 lanes (first half + second half of every group), keeping
    the accumulators in order; 8 -> 4 -> 2 -> 1 vectors, then (16 lanes) a fold of lane
    pairs.
    """
    i32 = ir.IntType(32)

    def pair(x, y, size):
        groups, half = vw // size, size // 2
        lo, hi = [], []
        for q in range(2 * groups):
            base = (q % groups) * size + (0 if q < groups else vw)
            lo += [base + r for r in range(half)]
            hi += [base + half + r for r in range(half)]
        m_lo = ir.Constant(ir.VectorType(i32, vw), lo)
        m_hi = ir.Constant(ir.VectorType(i32, vw), hi)
        return builder.fadd(builder.shuffle_vector(x, y, m_lo), builder.shuffle_vector(x, y, m_hi))

    vs, size = list(accs), vw
    while len(vs) > 1:
        vs = [pair(vs[i], vs[i + 1], size) for i in range(0, len(vs), 2)]
        size //= 2
    (v,) = vs
    if size == 1:
        return v
    # size == 2 (16 lanes): lane pairs (2j, 2j + 1) hold accumulator j.
    even = ir.Constant(ir.VectorType(i32, 8), list(range(0, 16, 2)))
    odd = ir.Constant(ir.VectorType(i32, 8), list(range(1, 16, 2)))
    return builder.fadd(builder.shuffle_vector(v, v, even), builder.shuffle_vector(v, v, odd))


def _make_dots_tile(mr: int, vw: int):
    """The intrinsic ``tile(x, x0, ldx, rows, r0, ldr, n, out, o0, ldo)``:

    out[o0 + i*ldo + j] = sum over p < n of x[x0 + i*ldx + p] * rows[r0 + j*ldr + p]
    for i < mr, j < 8: ``mr`` rows of ``x`` against eight rows of ``rows`` (all read in
    place), ``n`` a multiple of ``vw`` (the caller adds the tail). Per step: mr + 8 vector
    loads, 8*mr FMAs into independent accumulators.
    """

    @intrinsic
    def tile(typingctx, x, x0, ldx, rows, r0, ldr, n, out, o0, ldo):
        ints = (x0, ldx, r0, ldr, n, o0, ldo)
        if not (all(isinstance(v, types.Integer) for v in ints) and _f32_arrays(x, rows, out)):
            return None

        def codegen(context, builder, sig, args):
            i64 = ir.IntType(64)
            vec = ir.VectorType(ir.FloatType(), vw)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{vw}f32"
            )
            xp = _f32_data(context, builder, sig.args[0], args[0])
            rp = _f32_data(context, builder, sig.args[3], args[3])
            op = _f32_data(context, builder, sig.args[7], args[7])
            xs, xld, rs, rld, n_, os_, old = (
                _as_i64(builder, args[i]) for i in (1, 2, 4, 5, 6, 8, 9)
            )
            xrows = [builder.add(xs, builder.mul(xld, ir.Constant(i64, i))) for i in range(mr)]
            wrows = [builder.add(rs, builder.mul(rld, ir.Constant(i64, j))) for j in range(8)]

            def body(p, accs):
                xv = [_load_v8(builder, xp, builder.add(r, p), vw) for r in xrows]
                new = list(accs)
                for j, w in enumerate(wrows):
                    wv = _load_v8(builder, rp, builder.add(w, p), vw)
                    for i in range(mr):
                        new[i * 8 + j] = builder.call(fma, [xv[i], wv, accs[i * 8 + j]])
                return new

            zero = ir.Constant(vec, None)
            accs = _counted_loop(builder, n_, vw, body, [zero] * (8 * mr))
            v8 = ir.VectorType(ir.FloatType(), 8).as_pointer()
            for i in range(mr):
                total = _sum8(builder, accs[i * 8 : i * 8 + 8], vw)
                dst = builder.gep(op, [builder.add(os_, builder.mul(old, ir.Constant(i64, i)))])
                builder.store(total, builder.bitcast(dst, v8), align=4)
            return context.get_dummy_value()

        return types.void(x, x0, ldx, rows, r0, ldr, n, out, o0, ldo), codegen

    tile.__doc__ = f"{mr} x 8 tile of dot products (see _make_dots_tile), {vw} lanes."
    return tile


# Rows of a per tile: 3 with AVX-512 (24 zmm accumulators), 1 with AVX2 (8 of 16 ymm).
WROWS_MR = 3 if VW == 16 else 1
_dots_tile_max = _make_dots_tile(WROWS_MR, VW)
_dots_tile2 = _make_dots_tile(2, VW)
_dots_tile1 = _make_dots_tile(1, VW)
