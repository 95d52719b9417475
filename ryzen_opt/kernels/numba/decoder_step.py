"""One-token decode step of the Hugging Face decoders (Llama/Qwen2/Mistral, GPT-2) in one
Numba call, and the whole greedy loop in one more, in float32 or with int8 or bf16 weights.

At batch 1 a decode step reads every weight once (Qwen2-0.5B: 2 GB of float32 per token),
so it is bound by memory bandwidth: the GEMVs stream each weight row once for all batch
rows, and everything else (norms, RoPE, attention over the cache, activations, argmax) is
small work done between them, inside the same compiled call.

**Weights are read where the model keeps them.** The step reads the tensors of the
:class:`~ryzen_opt.optimization.fastpaths.decoder_layout.DecoderLayout` (the model's own
parameters and views of them) through a table of addresses and strides: no copy, no
re-pointing of ``param.data``, so the model's memory does not grow and its parameters stay
what they were. GPT-2's ``(in, out)`` Conv1D views (the three strided slices of ``c_attn``)
are read with the loop order that streams them contiguously: axpys over whole rows of the
``(in, out)`` storage, four rows a pass, instead of strided dot products; in parallel each
task takes a block of input rows and the partial sums are added after. The decoder
keeps the layout (so the tensors stay alive); if the model's parameters are replaced
(``param.data = ...``) build a new decoder (:meth:`NumbaDecoder.current` tells).

**int8** (``weights="int8"``): each matrix (q, k, v, o, gate, up, down and the head) is
quantised per output channel, symmetric, ``scale = max|w| / 127``, into one int8 arena of
``(out, in)`` rows plus float32 scales; activations stay float32 (each int8 weight is widened
to float32 in the dot product and the row sum is multiplied by its scale). The float32
weights stay in the model, the decoder owns the extra quarter. Norms, biases, embeddings and
learned positions are read in float32 from the model (the embedding gather reads one row a
token). A tied head (Qwen2) is quantised as the head; the embedding gather stays float32.

**bf16** (``weights="bf16"``): the same, with every matrix rounded to bfloat16 (nearest
even) instead of quantised: half the float32 bytes, each weight widened to float32 exactly
(its 16 bits shifted into a float32's high half) inside the dot product, activations and
accumulation in float32. The widening needs no bf16 instructions, so it runs on any CPU.

**Threads.** ``parallel=True`` runs each GEMV (q/k/v together, o, gate/up together, down,
head) as one ``prange`` region over blocks of output features, with as many threads as
``torch.get_num_threads()`` at call time; ``parallel=False`` runs on the calling thread.
Neither always wins: on a quiet 2-core VM the pool ran the Qwen2-0.5B-shaped step at 13.7
tokens/s against 7.7 serially, but with other processes on the cores every one of the ~100
fork-joins a token waits for a descheduled worker, and serial won 7.6 to 1.5. So the
default, ``parallel=None``, times both on the first call (:meth:`NumbaDecoder.calibrate`)
and keeps the faster.
"""

from __future__ import annotations

import time

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ryzen_opt.kernels.numba._common import (
    I0,
    JIT,
    NO,
    YES,
    _activate,
    _dot1x4,
    _exp,
    set_threads,
)
from ryzen_opt.optimization.fastpaths.decoder_layout import FAMILIES, DecoderLayout, Linear

__all__ = ["WEIGHTS", "NumbaDecoder", "supports"]

WEIGHTS = ("fp32", "int8", "bf16")

# Columns of the matrix table (one int64 row per matrix): data address, element strides of
# W(n, k) (n*SO + k*SI), out and in features, bias address (0: none), scale address (one
# float32 a row: int8 and bf16 weights; 0 for float32), elements spanned, weight kind.
_ADDR, _SO, _SI, _N, _K, _BIAS, _SCALE, _SPAN, _KIND = range(9)
_KIND_CODES = {"fp32": 0, "int8": 1, "bf16": 2}
_PER_LAYER = 7  # q, k, v, o, gate, up, down (gate has N = 0 without a gated MLP)
# Vector table: per layer attn-norm weight/bias, mlp-norm weight/bias; then final norm
# weight/bias, token embedding, learned positions (0 when absent).
_V_PER_LAYER = 4
# Integer config.
_C_LAYERS, _C_HIDDEN, _C_HEADS, _C_KV, _C_HD, _C_INTER, _C_VOCAB, _C_GPT2, _C_MAXPOS = range(9)
_SILU, _GELU_TANH = 3, 2  # _common.ACT_CODES
_TASKS_PER_THREAD = 8
_K_BLOCKS = 16  # most input blocks of the parallel column form (partial sums to add up)


@intrinsic
def _f32_at(typingctx, addr):
    """The float32 pointer at integer address ``addr`` (for ``numba.carray``)."""
    if not isinstance(addr, types.Integer):
        return None
    sig = types.CPointer(types.float32)(addr)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.FloatType()))

    return sig, codegen


@intrinsic
def _i8_at(typingctx, addr):
    """The int8 pointer at integer address ``addr``."""
    if not isinstance(addr, types.Integer):
        return None
    sig = types.CPointer(types.int8)(addr)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))

    return sig, codegen


@intrinsic
def _u16_at(typingctx, addr):
    """The uint16 (bf16 bits) pointer at integer address ``addr``."""
    if not isinstance(addr, types.Integer):
        return None
    sig = types.CPointer(types.uint16)(addr)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(16)))

    return sig, codegen


@intrinsic
def _widen(typingctx, v):
    """A stored weight as float32: an int8 converted, or bf16 bits shifted into the high
    half of a float32 (exact)."""
    if v == types.int8:

        def codegen(context, builder, sig, args):
            return builder.sitofp(args[0], ir.FloatType())

    elif v == types.uint16:

        def codegen(context, builder, sig, args):
            wide = builder.shl(
                builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16)
            )
            return builder.bitcast(wide, ir.FloatType())

    else:
        return None
    return types.float32(v), codegen


# ---------------------------------------------------------------------------------------------
# GEMV: y[b, col + j] (+)= W[j] . x[b] + bias[j] for output features j in [j0, j1)
# ---------------------------------------------------------------------------------------------


@njit(**JIT)
def _rows_f32(d, x, y, add, col, j0, j1):
    """Row-major W (``SI == 1``): four rows of W against each batch row, W read once."""
    nb, k = x.shape
    so = d[_SO]
    w = numba.carray(_f32_at(d[_ADDR]), (d[_SPAN],))
    j = j0
    while j + 4 <= j1:
        o = j * so
        r0 = w[o : o + k]
        r1 = w[o + so : o + so + k]
        r2 = w[o + 2 * so : o + 2 * so + k]
        r3 = w[o + 3 * so : o + 3 * so + k]
        for b in range(nb):
            s0, s1, s2, s3 = _dot1x4(x[b], r0, r1, r2, r3, k)
            yb = y[b]
            if add:
                yb[col + j] += s0
                yb[col + j + 1] += s1
                yb[col + j + 2] += s2
                yb[col + j + 3] += s3
            else:
                yb[col + j] = s0
                yb[col + j + 1] = s1
                yb[col + j + 2] = s2
                yb[col + j + 3] = s3
        j += 4
    while j < j1:
        r0 = w[j * so : j * so + k]
        for b in range(nb):
            xb = x[b]
            s0 = np.float32(0.0)
            for p in range(k):
                s0 += xb[p] * r0[p]
            if add:
                y[b, col + j] += s0
            else:
                y[b, col + j] = s0
        j += 1


@njit(**JIT)
def _rows_q(w, d, x, y, add, col, j0, j1):
    """Row-major W stored narrow (``w``: int8 or bf16 bits): each weight widened to float32,
    one scale per row after the sum (1 for bf16)."""
    nb, k = x.shape
    so = d[_SO]
    sc = numba.carray(_f32_at(d[_SCALE]), (d[_N],))
    j = j0
    while j + 4 <= j1:
        o = j * so
        r0 = w[o : o + k]
        r1 = w[o + so : o + so + k]
        r2 = w[o + 2 * so : o + 2 * so + k]
        r3 = w[o + 3 * so : o + 3 * so + k]
        for b in range(nb):
            xb = x[b]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for p in range(k):
                xv = xb[p]
                s0 += xv * _widen(r0[p])
                s1 += xv * _widen(r1[p])
                s2 += xv * _widen(r2[p])
                s3 += xv * _widen(r3[p])
            yb = y[b]
            if add:
                yb[col + j] += s0 * sc[j]
                yb[col + j + 1] += s1 * sc[j + 1]
                yb[col + j + 2] += s2 * sc[j + 2]
                yb[col + j + 3] += s3 * sc[j + 3]
            else:
                yb[col + j] = s0 * sc[j]
                yb[col + j + 1] = s1 * sc[j + 1]
                yb[col + j + 2] = s2 * sc[j + 2]
                yb[col + j + 3] = s3 * sc[j + 3]
        j += 4
    while j < j1:
        r0 = w[j * so : j * so + k]
        for b in range(nb):
            xb = x[b]
            s0 = np.float32(0.0)
            for p in range(k):
                s0 += xb[p] * _widen(r0[p])
            if add:
                y[b, col + j] += s0 * sc[j]
            else:
                y[b, col + j] = s0 * sc[j]
        j += 1


@njit(**JIT)
def _cols_f32(d, x, y, add, col, j0, j1, p0, p1):
    """Column-major W (``SO == 1``, GPT-2's (in, out) Conv1D): y[b, col+j] (+)= sum over
    p in [p0, p1) of x[b, p] * W(j, p), j in [j0, j1), as axpys over the contiguous rows of
    the (in, out) storage, four at a time (one load/store of y per four weight rows)."""
    nb = x.shape[0]
    si = d[_SI]
    w = numba.carray(_f32_at(d[_ADDR]), (d[_SPAN],))
    if not add:
        for b in range(nb):
            for j in range(j0, j1):
                y[b, col + j] = 0.0
    p = p0
    while p + 4 <= p1:
        o = p * si
        r0 = w[o + j0 : o + j1]
        r1 = w[o + si + j0 : o + si + j1]
        r2 = w[o + 2 * si + j0 : o + 2 * si + j1]
        r3 = w[o + 3 * si + j0 : o + 3 * si + j1]
        for b in range(nb):
            x0, x1, x2, x3 = x[b, p], x[b, p + 1], x[b, p + 2], x[b, p + 3]
            yb = y[b, col + j0 : col + j1]
            for j in range(j1 - j0):
                yb[j] += x0 * r0[j] + x1 * r1[j] + x2 * r2[j] + x3 * r3[j]
        p += 4
    while p < p1:
        r0 = w[p * si + j0 : p * si + j1]
        for b in range(nb):
            x0 = x[b, p]
            yb = y[b, col + j0 : col + j1]
            for j in range(j1 - j0):
                yb[j] += x0 * r0[j]
        p += 1


@njit(parallel=True, **JIT)
def _cols_parallel(mats, i0, i1, x, part, kb):
    """part[q, :, cols of W_i] = x[:, block q of k] @ W_i[block q]: the column form split
    over its input rows, so every task streams whole contiguous rows of the (in, out)
    storage (split over outputs, a task read 256-byte pieces of rows 3 KiB apart)."""
    for t in prange((i1 - i0) * kb):
        i = i0 + t // kb
        q = t % kb
        col = I0
        for e in range(i0, i):
            col += mats[e, _N]
        k = mats[i, _K]
        step = -(-k // kb)
        p0 = min(k, q * step)
        _cols_f32(mats[i], x, part[q], NO, col, I0, mats[i, _N], p0, min(k, p0 + step))


@njit(**JIT)
def _matrix_rows(d, x, y, add, col, j0, j1):
    if d[_KIND] == 1:
        _rows_q(numba.carray(_i8_at(d[_ADDR]), (d[_SPAN],)), d, x, y, add, col, j0, j1)
    elif d[_KIND] == 2:
        _rows_q(numba.carray(_u16_at(d[_ADDR]), (d[_SPAN],)), d, x, y, add, col, j0, j1)
    elif d[_SI] == 1:
        _rows_f32(d, x, y, add, col, j0, j1)
    else:
        _cols_f32(d, x, y, add, col, j0, j1, I0, x.shape[1])
    if d[_BIAS] != 0:
        bias = numba.carray(_f32_at(d[_BIAS]), (d[_N],))
        for b in range(x.shape[0]):
            for j in range(j0, j1):
                y[b, col + j] += bias[j]


@njit(**JIT)
def _gemv_rows(mats, i0, i1, x, y, add, r0, r1):
    """Rows [r0, r1) of the outputs of matrices i0..i1-1 stacked (they share the input)."""
    col = I0
    for i in range(i0, i1):
        n = mats[i, _N]
        a = max(r0, col)
        b = min(r1, col + n)
        if a < b:
            _matrix_rows(mats[i], x, y, add, col, a - col, b - col)
        col += n


@njit(parallel=True, **JIT)
def _gemv_parallel(mats, i0, i1, x, y, add, total, blk, tasks):
    for t in prange(tasks):
        _gemv_rows(mats, i0, i1, x, y, add, t * blk, min(total, (t + 1) * blk))


@njit(**JIT)
def _gemv(mats, i0, i1, x, y, add, threads, pbuf):
    """y (+)= x @ [W_i0; ...; W_i1-1].T (+ biases): one fork-join region when threaded
    (``pbuf``: scratch for the column form's partial sums)."""
    nb = x.shape[0]
    total = I0
    for i in range(i0, i1):
        total += mats[i, _N]
    cols = mats[i0, _KIND] == 0 and mats[i0, _SI] != 1
    kb = min(threads * 4, _K_BLOCKS)
    if threads > 1 and cols and kb * nb * total <= pbuf.shape[0]:
        part = pbuf[: kb * nb * total].reshape((kb, nb, total))
        _cols_parallel(mats, i0, i1, x, part, kb)
        for b in range(nb):
            yb = y[b]
            if not add:
                yb[:total] = 0.0
            for q in range(kb):
                pq = part[q, b]
                for j in range(total):
                    yb[j] += pq[j]
        col = 0
        for i in range(i0, i1):
            n = mats[i, _N]
            if mats[i, _BIAS] != 0:
                bias = numba.carray(_f32_at(mats[i, _BIAS]), (n,))
                for b in range(nb):
                    for j in range(n):
                        y[b, col + j] += bias[j]
            col += n
    elif threads > 1 and total >= 64:
        # TASKS_PER_THREAD blocks a thread (at least 64 outputs each), 16-aligned so the
        # column form's segments start on a cache line of a 64-byte-aligned matrix.
        blk = max(64, (-(-total // (threads * _TASKS_PER_THREAD)) + 15) // 16 * 16)
        tasks = -(-total // blk)
        _gemv_parallel(mats, i0, i1, x, y, add, total, blk, tasks)
    else:
        _gemv_rows(mats, i0, i1, x, y, add, I0, total)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


@njit(**JIT)
def _norm(vecs, iw, ib, eps, x, out, rms):
    """RMSNorm (``rms``: HF's float32 statistics, ``w * (x * rsqrt(mean(x^2) + eps))``) or
    LayerNorm (biased variance) of each row of x into out."""
    nb, c = x.shape
    w = numba.carray(_f32_at(vecs[iw]), (c,))
    for b in range(nb):
        xb = x[b]
        ob = out[b]
        if rms:
            ss = np.float32(0.0)
            for j in range(c):
                ss += xb[j] * xb[j]
            inv = np.float32(1.0) / np.sqrt(ss / np.float32(c) + eps)
            for j in range(c):
                ob[j] = w[j] * (xb[j] * inv)
        else:
            bias = numba.carray(_f32_at(vecs[ib]), (c,))
            s = np.float32(0.0)
            for j in range(c):
                s += xb[j]
            mean = s / np.float32(c)
            v = np.float32(0.0)
            for j in range(c):
                dv = xb[j] - mean
                v += dv * dv
            inv = np.float32(1.0) / np.sqrt(v / np.float32(c) + eps)
            for j in range(c):
                ob[j] = (xb[j] - mean) * inv * w[j] + bias[j]


@njit(**JIT)
def _rope(v, cos, sin, nh, hd):
    """v (heads * hd,) rotated in place: ``v*cos + rotate_half(v)*sin`` per head."""
    half = hd // 2
    for h in range(nh):
        o = h * hd
        for i in range(half):
            a = v[o + i]
            b = v[o + half + i]
            v[o + i] = a * cos[i] - b * sin[i]
            v[o + half + i] = b * cos[half + i] + a * sin[half + i]


@njit(**JIT)
def _attend(qkv, kc, vc, layer, t, start, heads, kvh, hd, scale, att, scores, task):
    """Task (b, h): softmax(scale q k^T) v over cache slots start[b]..t of kv head h//group."""
    b = task // heads
    h = task % heads
    g = h // (heads // kvh)
    q = qkv[b, h * hd : (h + 1) * hd]
    kb = kc[layer, b, g]
    vb = vc[layer, b, g]
    s = scores[task]
    s0 = start[b]
    o = att[b, h * hd : (h + 1) * hd]
    o[:] = 0.0
    if s0 > t:  # a pad slot: no valid key, zeros like scaled_dot_product_attention
        return
    best = np.float32(-np.inf)
    for j in range(s0, t + 1):
        kr = kb[j]
        acc = np.float32(0.0)
        for i in range(hd):
            acc += q[i] * kr[i]
        acc *= scale
        s[j] = acc
        best = max(best, acc)
    total = np.float32(0.0)
    for j in range(s0, t + 1):
        e = _exp(s[j] - best)
        s[j] = e
        total += e
    for j in range(s0, t + 1):
        p = s[j]
        vr = vb[j]
        for i in range(hd):
            o[i] += p * vr[i]
    inv = np.float32(1.0) / total
    for i in range(hd):
        o[i] *= inv


@njit(parallel=True, **JIT)
def _attend_parallel(qkv, kc, vc, layer, t, start, heads, kvh, hd, scale, att, scores):
    for task in prange(att.shape[0] * heads):
        # prange's index is unsigned: as int64, the serial loop's compiled copy serves it
        _attend(qkv, kc, vc, layer, t, start, heads, kvh, hd, scale, att, scores, np.int64(task))


@njit(**JIT)
def _step(mats, vecs, eps, cfg, fl, inv_freq, ids, kc, vc, t, start, logits, ws, threads):
    """Logits (B, vocab) of one token per row at cache slot t; writes slot t of kc/vc."""
    nb = ids.shape[0]
    n_layers = cfg[_C_LAYERS]
    c = cfg[_C_HIDDEN]
    heads = cfg[_C_HEADS]
    kvh = cfg[_C_KV]
    hd = cfg[_C_HD]
    inter = cfg[_C_INTER]
    gpt2 = cfg[_C_GPT2] == 1
    n_qkv = (heads + 2 * kvh) * hd
    n_ff = inter if gpt2 else 2 * inter
    t_max = kc.shape[3]
    attn_scale = fl[0]
    # Work areas carved from one scratch vector.
    o = 0
    x = ws[o : o + nb * c].reshape((nb, c))
    o += nb * c
    h = ws[o : o + nb * c].reshape((nb, c))
    o += nb * c
    qkv = ws[o : o + nb * n_qkv].reshape((nb, n_qkv))
    o += nb * n_qkv
    att = ws[o : o + nb * heads * hd].reshape((nb, heads * hd))
    o += nb * heads * hd
    ff = ws[o : o + nb * n_ff].reshape((nb, n_ff))
    o += nb * n_ff
    m = ws[o : o + nb * inter].reshape((nb, inter))
    o += nb * inter
    rot = ws[o : o + nb * 2 * hd].reshape((nb, 2 * hd))
    o += nb * 2 * hd
    scores = ws[o : o + nb * heads * t_max].reshape((nb * heads, t_max))
    o += nb * heads * t_max
    pbuf = ws[o:]

    n_vec = vecs.shape[0]
    emb = numba.carray(_f32_at(vecs[n_vec - 2]), (cfg[_C_VOCAB] * c,))
    for b in range(nb):
        row = emb[ids[b] * c : (ids[b] + 1) * c]
        for j in range(c):
            x[b, j] = row[j]
        pos = t - start[b]
        if gpt2:
            if pos < 0:  # a pad slot (start > t): torch's negative index wraps
                pos += cfg[_C_MAXPOS]
            pe = numba.carray(_f32_at(vecs[n_vec - 1]), ((pos + 1) * c,))
            for j in range(c):
                x[b, j] += pe[pos * c + j]
        else:
            # HF: float32 angles pos * inv_freq, halves repeated, cos/sin times the scale.
            half = hd // 2
            for i in range(half):
                a = np.float32(pos) * inv_freq[i]
                cv = np.float32(np.cos(a)) * fl[1]
                sv = np.float32(np.sin(a)) * fl[1]
                rot[b, i] = cv
                rot[b, half + i] = cv
                rot[b, hd + i] = sv
                rot[b, hd + half + i] = sv

    for layer in range(n_layers):
        mi = layer * _PER_LAYER
        vi = layer * _V_PER_LAYER
        _norm(vecs, vi, vi + 1, eps[2 * layer], x, h, not gpt2)
        _gemv(mats, mi, mi + 3, h, qkv, NO, threads, pbuf)
        for b in range(nb):
            qb = qkv[b]
            if not gpt2:
                _rope(qb[: (heads + kvh) * hd], rot[b, :hd], rot[b, hd:], heads + kvh, hd)
            for g in range(kvh):
                kc[layer, b, g, t, :] = qb[(heads + g) * hd : (heads + g + 1) * hd]
                vc[layer, b, g, t, :] = qb[(heads + kvh + g) * hd : (heads + kvh + g + 1) * hd]
        if threads > 1 and nb * heads > 1 and nb * heads * (t + 1) * hd >= 65536:
            _attend_parallel(qkv, kc, vc, layer, t, start, heads, kvh, hd, attn_scale, att, scores)
        else:
            for task in range(nb * heads):
                _attend(qkv, kc, vc, layer, t, start, heads, kvh, hd, attn_scale, att, scores, task)
        _gemv(mats, mi + 3, mi + 4, att, x, YES, threads, pbuf)
        _norm(vecs, vi + 2, vi + 3, eps[2 * layer + 1], x, h, not gpt2)
        if gpt2:
            _gemv(mats, mi + 5, mi + 6, h, ff, NO, threads, pbuf)
            for b in range(nb):
                for j in range(inter):
                    m[b, j] = _activate(ff[b, j], _GELU_TANH)
        else:
            _gemv(mats, mi + 4, mi + 6, h, ff, NO, threads, pbuf)
            for b in range(nb):
                for j in range(inter):
                    m[b, j] = _activate(ff[b, j], _SILU) * ff[b, inter + j]
        _gemv(mats, mi + 6, mi + 7, m, x, YES, threads, pbuf)
    fi = n_layers * _V_PER_LAYER
    _norm(vecs, fi, fi + 1, eps[2 * n_layers], x, h, not gpt2)
    _gemv(mats, n_layers * _PER_LAYER, n_layers * _PER_LAYER + 1, h, logits, NO, threads, pbuf)


@njit(**JIT)
def _argmax(row):
    """First maximum, NaN counting as the maximum (``torch.argmax``)."""
    best = 0
    top = row[0]
    if top != top:
        return 0
    for j in range(1, row.shape[0]):
        v = row[j]
        if v != v:
            return j
        if v > top:
            top = v
            best = j
    return best


@njit(**JIT)
def _greedy(
    mats,
    vecs,
    eps,
    cfg,
    fl,
    inv_freq,
    ids,
    kc,
    vc,
    t0,
    start,
    logits,
    ws,
    eos,
    pad,
    out,
    done,
    block,
    threads,
):
    """Up to out.shape[1] greedy steps from slot t0; ``ids`` (overwritten) is fed first. A row
    that emitted one of ``eos`` produces ``pad`` afterwards (fed back as its input, like HF
    generate); the loop stops once every row has. ``done`` (updated): rows already finished;
    in the first ``block`` steps the ``eos`` ids cannot be chosen (``min_new_tokens``).
    Returns the number of steps run."""
    nb = ids.shape[0]
    for s in range(out.shape[1]):
        _step(mats, vecs, eps, cfg, fl, inv_freq, ids, kc, vc, t0 + s, start, logits, ws, threads)
        finished = True
        for b in range(nb):
            if done[b]:
                tok = pad
            else:
                if s < block:
                    for e in eos:
                        logits[b, e] = -np.inf
                tok = _argmax(logits[b])
                for e in eos:
                    if tok == e:
                        done[b] = True
            out[b, s] = tok
            ids[b] = tok
            finished = finished and done[b]
        if finished:
            return s + 1
    return out.shape[1]


# ---------------------------------------------------------------------------------------------
# Python side
# ---------------------------------------------------------------------------------------------


def supports(layout: DecoderLayout, weights: str = "fp32") -> str | None:
    """``None`` if :class:`NumbaDecoder` can run ``layout`` with ``weights``, else the reason."""
    if weights not in WEIGHTS:
        return f"weights={weights!r}: expected one of {', '.join(WEIGHTS)}"
    if layout.family not in FAMILIES:
        return f"family {layout.family!r} is not one of {', '.join(FAMILIES)}"
    if layout.device.type != "cpu":
        return f"the model is on {layout.device}, the Numba decoder step runs on cpu"
    want = {"llama": "silu_gate", "gpt2": "gelu_tanh"}[layout.family]
    if layout.activation != want:
        return f"activation {layout.activation!r}: the {layout.family} step implements {want}"
    if layout.family == "llama" and (layout.rope_inv_freq is None or layout.head_dim % 2):
        return "llama layout without rotary frequencies or with an odd head_dim"
    if layout.family == "gpt2" and layout.pos_embed is None:
        return "gpt2 layout without learned positions"
    if layout.heads % layout.kv_heads:
        return f"heads={layout.heads} is not a multiple of kv_heads={layout.kv_heads}"
    for name, t in _tensors(layout):
        if t.device.type != "cpu":
            return f"{name} is on {t.device}, the Numba decoder step runs on cpu"
        if t.dtype != torch.float32:
            return f"{name} is {t.dtype}: the Numba decoder step reads float32 models only"
        needs_rows = t.dim() == 1 or name.endswith(("embed", "pos_embed"))
        if needs_rows and not t.is_contiguous():
            return f"{name} is not contiguous"
    for name, lin in _linears(layout):
        so, si = lin.strides()
        if si != 1 and so != 1:
            return f"{name}.weight has strides (out {so}, in {si}): neither axis is contiguous"
    return None


def _linears(layout: DecoderLayout):
    for i, lay in enumerate(layout.layers):
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            lin = getattr(lay, name)
            if lin is not None:
                yield f"layers[{i}].{name}", lin
    yield "head", layout.head


def _tensors(layout: DecoderLayout):
    yield "embed", layout.embed
    if layout.pos_embed is not None:
        yield "pos_embed", layout.pos_embed
    for i, lay in enumerate(layout.layers):
        for nname in ("attn_norm", "mlp_norm"):
            nrm = getattr(lay, nname)
            yield f"layers[{i}].{nname}.weight", nrm.weight
            if nrm.bias is not None:
                yield f"layers[{i}].{nname}.bias", nrm.bias
    yield "final_norm.weight", layout.final_norm.weight
    if layout.final_norm.bias is not None:
        yield "final_norm.bias", layout.final_norm.bias
    for name, lin in _linears(layout):
        yield f"{name}.weight", lin.weight
        if lin.bias is not None:
            yield f"{name}.bias", lin.bias


def _quantise(lin: Linear, q_out: np.ndarray, s_out: np.ndarray, rows: int = 8192) -> None:
    """Symmetric per-output-channel int8 of lin's (out, in) weight into q_out / s_out, in row
    blocks so the float32 temporaries stay small (the Qwen2 head is 545 MB of float32)."""
    w = lin.weight.detach()
    if lin.transposed:
        w = w.t()
    n = w.shape[0]
    for r in range(0, n, rows):
        blk = w[r : r + rows].float()
        amax = blk.abs().amax(dim=1)
        scale = amax / 127.0
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        q = torch.round(blk * inv[:, None]).clamp_(-127, 127).to(torch.int8)
        q_out[r : r + rows] = q.numpy()
        s_out[r : r + rows] = scale.numpy()


def _to_bf16(lin: Linear, out: np.ndarray, rows: int = 8192) -> None:
    """lin's (out, in) weight rounded to bfloat16 (nearest even), its bits into ``out``
    (uint16), in row blocks as :func:`_quantise`."""
    w = lin.weight.detach()
    if lin.transposed:
        w = w.t()
    for r in range(0, w.shape[0], rows):
        out[r : r + rows] = w[r : r + rows].to(torch.bfloat16).view(torch.int16).numpy()


class NumbaDecoder:
    """The fused decode step and greedy loop of one :class:`DecoderLayout`.

    Args:
        layout: from ``families.<name>.layout(model)``; float32 on the CPU.
        weights: ``"fp32"`` reads the model's weights in place (no copy); ``"int8"``
            quantises every matrix per output channel into int8 the decoder owns (1/4 of the
            float32 bytes) and reads those instead; ``"bf16"`` rounds them to bfloat16 (1/2
            of the bytes) likewise.
        parallel: ``True`` spreads each GEMV over ``torch.get_num_threads()`` Numba
            threads; ``False`` runs on the calling thread; ``None`` (default) picks the
            faster of the two by timing them (:meth:`calibrate`) on first use.

    Example:
        >>> dec = NumbaDecoder(families.llama.layout(model), weights="int8")  # doctest: +SKIP
        >>> kc, vc = dec.layout.new_cache(1, 64)  # doctest: +SKIP
        >>> logits = dec.step(ids, kc.numpy(), vc.numpy(), t, start)  # doctest: +SKIP
    """

    def __init__(self, layout: DecoderLayout, weights: str = "fp32", parallel: bool | None = None):
        reason = supports(layout, weights)
        if reason is not None:
            raise ValueError(f"layout: {reason}")
        self.layout, self.weights, self.parallel = layout, weights, parallel
        lins = list(_linears(layout))
        n_layers = layout.num_layers
        mats = np.zeros((n_layers * _PER_LAYER + 1, _KIND + 1), dtype=np.int64)
        # The narrow copy of every matrix (int8 or bf16 bits) and one float32 scale a row.
        self.narrow = self.scales = None
        if weights != "fp32":
            sizes = [lin.out_features * lin.in_features for _, lin in lins]
            self.narrow = np.empty(sum(sizes), dtype=np.int8 if weights == "int8" else np.uint16)
            self.scales = np.ones(sum(lin.out_features for _, lin in lins), dtype=np.float32)
        qo = so_ = 0
        slot = 0
        for i, lay in enumerate(layout.layers):
            for j, name in enumerate(("q", "k", "v", "o", "gate", "up", "down")):
                lin = getattr(lay, name)
                if lin is not None:
                    qo, so_ = self._fill(mats[i * _PER_LAYER + j], lin, qo, so_)
                slot += 1
        self._fill(mats[-1], layout.head, qo, so_)
        self._mats = mats
        vecs = np.zeros(n_layers * _V_PER_LAYER + 4, dtype=np.int64)
        eps = np.zeros(2 * n_layers + 1, dtype=np.float32)
        for i, lay in enumerate(layout.layers):
            for j, nrm in enumerate((lay.attn_norm, lay.mlp_norm)):
                vecs[i * 4 + 2 * j] = nrm.weight.data_ptr()
                vecs[i * 4 + 2 * j + 1] = 0 if nrm.bias is None else nrm.bias.data_ptr()
                eps[2 * i + j] = nrm.eps
        fn = layout.final_norm
        vecs[-4] = fn.weight.data_ptr()
        vecs[-3] = 0 if fn.bias is None else fn.bias.data_ptr()
        vecs[-2] = layout.embed.data_ptr()
        vecs[-1] = 0 if layout.pos_embed is None else layout.pos_embed.data_ptr()
        eps[-1] = fn.eps
        self._vecs, self._eps = vecs, eps
        gpt2 = layout.family == "gpt2"
        self._cfg = np.array(
            [
                n_layers,
                layout.hidden,
                layout.heads,
                layout.kv_heads,
                layout.head_dim,
                layout.intermediate,
                layout.vocab,
                int(gpt2),
                layout.max_positions,
            ],
            dtype=np.int64,
        )
        self._fl = np.array([layout.attn_scale, layout.rope_scale], dtype=np.float32)
        inv = layout.rope_inv_freq
        self._inv_freq = (
            np.zeros(1, np.float32) if inv is None else inv.detach().float().numpy().copy()
        )
        self._ptrs = self._fingerprint()
        self._ws: dict[tuple[int, int], np.ndarray] = {}

    def _fill(self, row: np.ndarray, lin: Linear, qo: int, so_: int) -> tuple[int, int]:
        n, k = lin.out_features, lin.in_features
        row[_N], row[_K] = n, k
        row[_BIAS] = 0 if lin.bias is None else lin.bias.data_ptr()
        row[_KIND] = _KIND_CODES[self.weights]
        if self.weights != "fp32":
            q = self.narrow[qo : qo + n * k].reshape(n, k)
            s = self.scales[so_ : so_ + n]
            if self.weights == "int8":
                _quantise(lin, q, s)
            else:
                _to_bf16(lin, q)
            row[_ADDR], row[_SO], row[_SI], row[_SPAN] = q.ctypes.data, k, 1, n * k
            row[_SCALE] = s.ctypes.data
            return qo + n * k, so_ + n
        so, si = lin.strides()
        row[_ADDR], row[_SO], row[_SI] = lin.weight.data_ptr(), so, si
        row[_SPAN] = (n - 1) * so + (k - 1) * si + 1
        return qo, so_

    def _fingerprint(self) -> tuple[int, ...]:
        ptrs = tuple(t.data_ptr() for _, t in _tensors(self.layout))
        if self.weights == "fp32":
            return ptrs  # read in place: edits of the values are seen
        # The narrow copies are stale once a matrix is edited in place (a merged adapter,
        # load_state_dict): its version counter moves.
        return ptrs + tuple(lin.weight._version for _, lin in _linears(self.layout))

    def current(self) -> bool:
        """Whether the layout's tensors are still where the decoder read their addresses
        (and, for int8/bf16 weights, unedited since they were converted)."""
        return self._fingerprint() == self._ptrs

    @property
    def owned_bytes(self) -> int:
        """Weight bytes the decoder holds itself (0 for fp32: it reads the model's)."""
        if self.narrow is None:
            return 0
        return self.narrow.nbytes + self.scales.nbytes

    def _workspace(self, batch: int, t_max: int) -> np.ndarray:
        lay = self.layout
        key = (batch, t_max)
        if key not in self._ws:
            c, hd, inter = lay.hidden, lay.head_dim, lay.intermediate
            n = batch * (
                2 * c
                + (lay.heads + 2 * lay.kv_heads) * hd
                + lay.heads * hd
                + 3 * inter
                + 2 * hd
                + lay.heads * t_max
                + _K_BLOCKS * max((lay.heads + 2 * lay.kv_heads) * hd, inter, c)
            )
            self._ws = {key: np.zeros(n, dtype=np.float32)}  # one size kept: the latest
        return self._ws[key]

    def calibrate(self, repeats: int = 3) -> dict[str, float]:
        """Time the serial and the pooled step (interleaved, best of ``repeats`` each, on a
        one-slot scratch cache) and keep the faster; returns the seconds of each."""
        lay = self.layout
        kc, vc = (np.zeros((lay.num_layers, 1, lay.kv_heads, 1, lay.head_dim), np.float32),) * 2
        ids, start = np.zeros(1, np.int64), np.zeros(1, np.int64)
        best = {False: np.inf, True: np.inf}
        for _ in range(repeats):
            for mode in (False, True):
                self.parallel = mode
                t0 = time.perf_counter()
                self.step(ids, kc, vc, 0, start)
                best[mode] = min(best[mode], time.perf_counter() - t0)
        self.parallel = best[True] < best[False]
        return {"serial": best[False], "pool": best[True]}

    def _run(self, kernel, *args):
        if self.parallel is None:
            self.calibrate()
        if not self.parallel:
            return kernel(*self._args(), *args, 1)
        # Tasks handed out one at a time (numba's default splits a prange evenly up front):
        # on a shared machine one thread's core may be busy, and an even split would make
        # every GEMV wait for that thread. Set from Python: inside jitted code the call
        # would make the kernels uncacheable. Thread-local, restored after the call.
        old = numba.set_parallel_chunksize(1)
        try:
            return kernel(*self._args(), *args, set_threads())
        finally:
            numba.set_parallel_chunksize(old)

    def _check(self, ids, k_cache, v_cache, t, start, steps: int = 1):
        lay = self.layout
        ids = np.ascontiguousarray(_np(ids), dtype=np.int64)
        start = np.ascontiguousarray(_np(start), dtype=np.int64)
        k_cache, v_cache = _np(k_cache), _np(v_cache)
        if ids.ndim != 1:
            raise ValueError(f"ids: expected shape (batch,), got {ids.shape}")
        b = ids.shape[0]
        if b == 0:
            raise ValueError("ids: empty batch")
        if ids.min() < 0 or ids.max() >= lay.vocab:
            raise ValueError(f"ids: token ids must be in [0, {lay.vocab})")
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not isinstance(c, np.ndarray) or c.dtype != np.float32:
                raise ValueError(f"{name}: expected a float32 numpy array (or CPU tensor)")
            if c.ndim != 5 or c.shape[:3] != (lay.num_layers, b, lay.kv_heads):
                raise ValueError(
                    f"{name}: expected shape ({lay.num_layers}, {b}, {lay.kv_heads}, T, "
                    f"{lay.head_dim}), got {c.shape}"
                )
            if c.shape[4] != lay.head_dim or not c.flags.c_contiguous:
                raise ValueError(f"{name}: expected a C-contiguous (..., {lay.head_dim}) cache")
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"v_cache: shape {v_cache.shape} != k_cache {k_cache.shape}")
        t = int(t)
        if start.shape != (b,):
            raise ValueError(f"start: expected shape ({b},), got {start.shape}")
        last = t + steps - 1
        if t < 0 or last >= k_cache.shape[3]:
            raise ValueError(f"t: slots {t}..{last} do not fit a cache of {k_cache.shape[3]}")
        if start.min() < 0 or start.max() >= k_cache.shape[3]:
            raise ValueError(f"start: every row's first slot must be in [0, {k_cache.shape[3]})")
        if lay.family == "gpt2" and last - int(start.min()) >= lay.max_positions:
            raise ValueError(f"t: position beyond max_positions={lay.max_positions}")
        if not self.current():
            raise RuntimeError(
                "the model's weights moved (or, for int8/bf16 weights, changed) since the "
                "decoder was built"
            )
        return ids, k_cache, v_cache, t, start

    def step(self, ids, k_cache, v_cache, t: int, start) -> np.ndarray:
        """One token per row at cache slot ``t`` (``reference_step``'s semantics).

        Args:
            ids: ``(batch,)`` int64 token ids.
            k_cache, v_cache: ``(layers, batch, kv_heads, T, head_dim)`` float32 numpy arrays
                (or CPU tensors, read through ``.numpy()``); slot ``t`` is written.
            t: the cache slot of this token.
            start: ``(batch,)`` int64 first valid slot per row (left padding); the row's
                position is ``t - start`` and it attends to slots ``start..t``.

        Returns:
            ``(batch, vocab)`` float32 logits.
        """
        ids, kc, vc, t, start = self._check(ids, k_cache, v_cache, t, start)
        logits = np.empty((ids.shape[0], self.layout.vocab), dtype=np.float32)
        ws = self._workspace(ids.shape[0], kc.shape[3])
        self._run(_step, ids, kc, vc, t, start, logits, ws)
        return logits

    def greedy(
        self,
        ids_last,
        k_cache,
        v_cache,
        t0: int,
        start,
        n_new: int,
        eos_ids=(),
        pad_id=0,
        finished=None,
        block: int = 0,
    ) -> tuple[np.ndarray, int]:
        """Greedy decoding in one call: ``ids_last`` is fed at slot ``t0``, each step's argmax
        at the next slot.

        Args:
            ids_last: ``(batch,)`` int64, the last prompt token of each row (its k/v not yet
                in the cache).
            k_cache, v_cache: as in :meth:`step`, holding slots ``start..t0 - 1``; slots
                ``t0..t0 + n_new - 1`` must fit.
            t0: the slot of ``ids_last``.
            start: ``(batch,)`` int64 first valid slot per row.
            n_new: tokens to generate per row.
            eos_ids: ids that end a row (an int or an iterable; empty: never).
            pad_id: what a finished row emits (and is fed).
            finished: ``(batch,)`` bool, rows already finished (they emit ``pad_id``).
            block: in the first ``block`` steps the ``eos_ids`` cannot be chosen (HF's
                ``min_new_tokens``).

        Returns:
            ``(tokens, steps)``: ``tokens`` ``(batch, n_new)`` int64; once a row emitted one of
            ``eos_ids`` its later tokens are ``pad_id`` (HF generate's rule); the loop stops
            when every row has finished, after ``steps`` steps (later columns are
            ``pad_id``).
        """
        n_new = int(n_new)
        if n_new < 1:
            raise ValueError(f"n_new: expected >= 1, got {n_new}")
        if not 0 <= int(pad_id) < self.layout.vocab:
            raise ValueError(f"pad_id: {pad_id} is not a token id in [0, {self.layout.vocab})")
        ids, kc, vc, t0, start = self._check(ids_last, k_cache, v_cache, t0, start, n_new)
        ids = ids.copy()
        eos = np.asarray(list(eos_ids) if not np.isscalar(eos_ids) else [eos_ids], np.int64)
        out = np.full((ids.shape[0], n_new), int(pad_id), dtype=np.int64)
        logits = np.empty((ids.shape[0], self.layout.vocab), dtype=np.float32)
        ws = self._workspace(ids.shape[0], kc.shape[3])
        nb = ids.shape[0]
        done = np.zeros(nb, np.bool_) if finished is None else np.array(_np(finished), np.bool_)
        if done.shape != (nb,):
            raise ValueError(f"finished: expected shape ({nb},), got {done.shape}")
        # eos ids outside the vocabulary can never be produced (and must not index logits)
        eos = eos[(eos >= 0) & (eos < self.layout.vocab)]
        steps = self._run(
            _greedy, ids, kc, vc, t0, start, logits, ws, eos, int(pad_id), out, done, int(block)
        )
        return out, int(steps)

    def _args(self):
        return self._mats, self._vecs, self._eps, self._cfg, self._fl, self._inv_freq


def _np(a):
    return a.detach().numpy() if isinstance(a, torch.Tensor) else a
