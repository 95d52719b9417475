"""Fused one-token decode step of the ``SimpleTransformerModel`` family: one Numba call.

A decode step of the eager baseline is ~30 PyTorch ops per layer plus the head, each a few
microseconds of dispatch for microseconds of work at batch 1. Here the whole step (token and
position embedding, per layer LayerNorm -> qkv -> cache write -> attention over the cache ->
proj + residual -> LayerNorm -> fc1 + GELU -> fc2 + residual, final LayerNorm, head) is one
call into compiled code that reuses the matmul and LayerNorm kernels of this backend.

The weights are read from one float32 *arena* (every parameter of the model laid out back to
back, see ``ryzen_opt.optimization.fastpaths.cpu``) through offset tables, so the call has a
dozen arguments instead of two dozen arrays (Numba's dispatcher type-checks every argument
on every call). The KV cache is a preallocated ``(layers, batch, heads, max_seq_len,
head_dim)`` pair; a step writes position ``pos`` and attends to ``0..pos``.

**LoRA.** With adapters that are not merged (:mod:`ryzen_opt.adapters`), each of a layer's
four linears adds ``scaling * B (A x)`` per row before its activation, from tables built by
the caller: ``lora_t[layer, slot, row] = (A offset, B^T offset, rank)`` into the flat
``lora_a`` / ``lora_b`` arrays and ``lora_s[layer, slot, row]`` the scaling (rank 0: no
adapter for that row). Each row may use its own adapter (a mixed batch). The shrink is
``rank`` dot products over the input, the expand ``rank`` axpys over the output (``B``
stored transposed, ``(rank, out)``): at rank 16 each is ~1/16 of the base matmul's
multiply-adds.

``parallel=True`` spreads each matmul's column blocks and the (batch, head) attention tasks
over Numba's thread pool (one fork-join region per op, ~2 us each when the pool is hot);
``False`` runs everything on the calling thread. Which one is faster depends on the batch
and the machine, so ``optimize()`` measures both.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ryzen_opt.kernels.numba._common import (
    I0,
    JIT,
    MR,
    NO,
    NR,
    YES,
    _dot1x4,
    _exp,
    _fma_rows_tile,
)
from ryzen_opt.kernels.numba.layer_norm import _layer_norm_row
from ryzen_opt.kernels.numba.matmul import _epilogue

# The offset tables follow ryzen_opt.optimization.fastpaths.layout.STM_LAYOUT (layer, model):
# per layer ln1 w/b, qkv w/b, proj w/b, ln2 w/b, fc1 w/b, fc2 w/b; then token embedding,
# position embedding, final LayerNorm w/b, head weight.
_GELU = np.int64(1)  # _common.ACT_CODES["gelu"] (an int64: see _common.I0)
MAX_LORA_RANK = 256  # the scratch of a LoRA shrink (ranks above it are refused by the caller)
# No LoRA: empty tables (typed like real ones, so one compiled signature serves both).
NO_LORA = (
    np.zeros(0, np.float32),
    np.zeros(0, np.float32),
    np.zeros((0, 4, 1, 3), np.int64),
    np.zeros((0, 4, 1), np.float32),
)


@njit(**JIT)
def _gemv_task(w, o_w, k, x, c, j0, j1):
    """c[0, j] = W[j] . x[0] for j in [j0, j1): one token row (batch-1 decode).

    Four rows of W per pass (``_common._dot1x4``); measured 22-31 GFLOP/s on one core,
    which is about the L3 bandwidth for weights that do not fit in L2.
    """
    xr = x[0]
    j = j0
    while j + 4 <= j1:
        o = o_w + j * k
        s = _dot1x4(
            xr,
            w[o : o + k],
            w[o + k : o + 2 * k],
            w[o + 2 * k : o + 3 * k],
            w[o + 3 * k : o + 4 * k],
            k,
        )
        c[0, j] = s[0]
        c[0, j + 1] = s[1]
        c[0, j + 2] = s[2]
        c[0, j + 3] = s[3]
        j += 4
    while j < j1:
        acc = np.float32(0.0)
        base = o_w + j * k
        for p in range(k):
            acc += xr[p] * w[base + p]
        c[0, j] = acc
        j += 1


@njit(**JIT)
def _pack_rows_t(x, xt):
    """xt[p, kk, r] = x[p*NR + r, kk] (zero past the last row): X^T in NR-wide panels."""
    m, k = x.shape
    for p in range(xt.shape[0]):
        for r in range(NR):
            i = p * NR + r
            if i < m:
                for kk in range(k):
                    xt[p, kk, r] = x[i, kk]
            else:
                for kk in range(k):
                    xt[p, kk, r] = 0.0


@njit(**JIT)
def _rows_task(w, o_w, k, n, xt, m, c, j0, j1, acc):
    """c[:m, j0:j1] = X @ W[j0:j1].T from MR-row tiles of W read in place (n >= MR).

    The last tile of the matrix is shifted back to end at row n (recomputing a few rows)
    so no read goes past W.
    """
    for p in range(xt.shape[0]):
        rows = min(NR, m - p * NR)
        for r in range(j0, j1, MR):
            r0 = min(r, n - MR)
            _fma_rows_tile(w, o_w + r0 * k, k, xt[p], k, acc)
            for i in range(r - r0, MR):
                col = r0 + i
                if col < j1:
                    for q in range(rows):
                        c[p * NR + q, col] = acc[i * NR + q]


@njit(**JIT)
def _linear_task(w, o_w, o_b, has_b, a, xt, n, c, res, has_res, act, blk, t, acc):
    m, k = a.shape
    j0 = t * blk
    j1 = min(j0 + blk, n)
    if m == 1:
        _gemv_task(w, o_w, k, a, c, j0, j1)
    elif n < MR:
        _small_task(w, o_w, k, a, c, j0, j1)
    else:
        _rows_task(w, o_w, k, n, xt, m, c, j0, j1, acc)
    _epilogue(c, I0, m, j0, j1, w[o_b : o_b + n], has_b, res, has_res, act)


@njit(**JIT)
def _small_task(w, o_w, k, a, c, j0, j1):
    """Plain dot products (matrices narrower than one register tile)."""
    for i in range(a.shape[0]):
        for j in range(j0, j1):
            acc = np.float32(0.0)
            for p in range(k):
                acc += a[i, p] * w[o_w + j * k + p]
            c[i, j] = acc


@njit(parallel=True, **JIT)
def _linear_parallel(w, o_w, o_b, has_b, a, xt, n, c, res, has_res, act, blk, tasks):
    for t in prange(tasks):
        acc = np.empty(MR * NR, dtype=np.float32)
        ti = np.int64(t)  # prange's index is unsigned: the serial loop's copy serves it as int64
        _linear_task(w, o_w, o_b, has_b, a, xt, n, c, res, has_res, act, blk, ti, acc)


@njit(**JIT)
def _linear(w, o_w, o_b, has_b, a, n, c, res, has_res, act, threads, xt_buf, acc):
    """c = act(a @ W.T + b) (+ res) for a (M, K) and W the (n, K) block of the arena at o_w.

    Batch 1 takes 1x8 dot products over W's rows; more rows pack X^T into NR-wide panels
    (a few KiB) and run the register tile over W in place. Column blocks of ``blk`` outputs
    are the parallel tasks.
    """
    m, k = a.shape
    panels = -(-m // NR)
    xt = xt_buf[: panels * k * NR].reshape((panels, k, NR))
    if m > 1 and n >= MR:
        _pack_rows_t(a, xt)
    blk = 8 * MR * max(1, -(-n // (8 * MR * 4 * threads)))  # >= 4 tasks per thread
    tasks = -(-n // blk)
    if threads > 1 and tasks > 1:
        _linear_parallel(w, o_w, o_b, has_b, a, xt, n, c, res, has_res, act, blk, tasks)
    else:
        for t in range(tasks):
            _linear_task(w, o_w, o_b, has_b, a, xt, n, c, res, has_res, act, blk, t, acc)


@njit(**JIT)
def _lora_add(x, out, la, lb, lt, ls, layer, slot, t):
    """``out[b] += ls * B (A x[b])`` for each row ``b`` with an adapter at ``(layer, slot)``;
    ``t``: rank-wide scratch. True if any row had one."""
    k, n = x.shape[1], out.shape[1]
    any_row = False
    for b in range(x.shape[0]):
        r = lt[layer, slot, b, 2]
        if r == 0:
            continue
        any_row = True
        oa, ob, sc = lt[layer, slot, b, 0], lt[layer, slot, b, 1], ls[layer, slot, b]
        xb = x[b]
        for q in range(r):
            acc = np.float32(0.0)
            row = oa + q * k
            for p in range(k):
                acc += xb[p] * la[row + p]
            t[q] = acc
        yb = out[b]
        for q in range(r):  # B is stored transposed, (rank, out): one axpy per rank
            tq = t[q] * sc
            row = ob + q * n
            for j in range(n):
                yb[j] += tq * lb[row + j]
    return any_row


@njit(**JIT)
def _layer_norm(w, o_w, o_b, x, out, eps):
    for i in range(x.shape[0]):
        _layer_norm_row(x, x, False, x, w[o_w:], True, w[o_b:], True, out, eps, i)


@njit(**JIT)
def _attend(qkv, kc, vc, layer, pos, heads, out, scores, task):
    """Task (b, h): write k/v at ``pos``, then softmax(q k^T / sqrt(d)) v over 0..pos."""
    b = task // heads
    hd = task % heads
    c = out.shape[1]
    d = c // heads
    q = qkv[b, hd * d : (hd + 1) * d]
    kb = kc[layer, b, hd]
    vb = vc[layer, b, hd]
    kb[pos, :] = qkv[b, c + hd * d : c + (hd + 1) * d]
    vb[pos, :] = qkv[b, 2 * c + hd * d : 2 * c + (hd + 1) * d]
    scale = np.float32(1.0) / np.sqrt(np.float32(d))
    s = scores[task]
    best = np.float32(-np.inf)
    for t in range(pos + 1):
        krow = kb[t]
        acc = np.float32(0.0)
        for j in range(d):
            acc += q[j] * krow[j]
        acc *= scale
        s[t] = acc
        best = max(best, acc)
    total = np.float32(0.0)
    for t in range(pos + 1):
        e = _exp(s[t] - best)
        s[t] = e
        total += e
    o = out[b, hd * d : (hd + 1) * d]
    o[:] = 0.0
    for t in range(pos + 1):
        p = s[t]
        vrow = vb[t]
        for j in range(d):
            o[j] += p * vrow[j]
    inv = np.float32(1.0) / total
    for j in range(d):
        o[j] *= inv


@njit(parallel=True, **JIT)
def _attend_parallel(qkv, kc, vc, layer, pos, heads, out, scores):
    for task in prange(out.shape[0] * heads):
        _attend(qkv, kc, vc, layer, pos, heads, out, scores, np.int64(task))  # prange: unsigned


@njit(**JIT)
def _decode_step(w, loff, goff, heads, f, eps, ids, pos, kc, vc, logits, ws, threads, lora):
    """Logits (B, V) of one token per row at position ``pos``; kc/vc updated at ``pos``.
    ``lora``: ``(lora_a, lora_b, lora_t, lora_s)`` (see the module docstring); an empty
    ``lora_t`` (no layers) adds nothing."""
    la, lb, lt, ls = lora
    has_lora = lt.shape[0] > 0
    nb = ids.shape[0]
    n_layers = loff.shape[0]
    t_max = kc.shape[3]
    vocab = logits.shape[1]
    c = kc.shape[2] * kc.shape[4]
    # Work areas carved from one scratch vector.
    o = 0
    x = ws[o : o + nb * c].reshape((nb, c))
    o += nb * c
    x2 = ws[o : o + nb * c].reshape((nb, c))
    o += nb * c
    h = ws[o : o + nb * c].reshape((nb, c))
    o += nb * c
    att = ws[o : o + nb * c].reshape((nb, c))
    o += nb * c
    qkv = ws[o : o + nb * 3 * c].reshape((nb, 3 * c))
    o += nb * 3 * c
    ff = ws[o : o + nb * f].reshape((nb, f))
    o += nb * f
    scores = ws[o : o + nb * heads * t_max].reshape((nb * heads, t_max))
    o += nb * heads * t_max
    acc = ws[o : o + MR * NR]
    o += MR * NR
    t_lora = ws[o : o + MAX_LORA_RANK]
    o += MAX_LORA_RANK
    xt_buf = ws[o:]

    tok, pe = goff[0], goff[1] + pos * c
    for b in range(nb):
        row = ids[b] * c + tok
        for j in range(c):
            x[b, j] = w[row + j] + w[pe + j]
    for layer in range(n_layers):
        off = loff[layer]
        _layer_norm(w, off[0], off[1], x, h, eps)
        _linear(w, off[2], off[3], YES, h, 3 * c, qkv, x, NO, I0, threads, xt_buf, acc)
        if has_lora:
            _lora_add(h, qkv, la, lb, lt, ls, layer, I0, t_lora)
        if threads > 1 and nb * heads > 1:
            _attend_parallel(qkv, kc, vc, layer, pos, heads, att, scores)
        else:
            for task in range(nb * heads):
                _attend(qkv, kc, vc, layer, pos, heads, att, scores, task)
        _linear(w, off[4], off[5], YES, att, c, x2, x, YES, I0, threads, xt_buf, acc)
        if has_lora:
            _lora_add(att, x2, la, lb, lt, ls, layer, np.int64(1), t_lora)
        _layer_norm(w, off[6], off[7], x2, h, eps)
        if has_lora and lt[layer, 2, :, 2].max() > 0:  # GELU after the update
            _linear(w, off[8], off[9], YES, h, f, ff, x, NO, I0, threads, xt_buf, acc)
            _lora_add(h, ff, la, lb, lt, ls, layer, np.int64(2), t_lora)
            _epilogue(ff, I0, nb, I0, f, w, NO, ff, NO, _GELU)
        else:
            _linear(w, off[8], off[9], YES, h, f, ff, x, NO, _GELU, threads, xt_buf, acc)
        _linear(w, off[10], off[11], YES, ff, c, x, x2, YES, I0, threads, xt_buf, acc)
        if has_lora:
            _lora_add(ff, x, la, lb, lt, ls, layer, np.int64(3), t_lora)
    _layer_norm(w, goff[2], goff[3], x, h, eps)
    _linear(w, goff[4], goff[4], NO, h, vocab, logits, x, NO, I0, threads, xt_buf, acc)


@njit(**JIT)
def _greedy_steps(
    w, loff, goff, heads, f, eps, ids, pos, n, kc, vc, logits, ws, threads, eos, out, lora
):
    """Up to ``n`` greedy steps: feed ``ids`` at ``pos``, ``pos + 1``, ...; ``out[:, s]`` is the
    argmax of step ``s``'s logits (the first maximum, NaN counting as the maximum, like
    ``torch.argmax``), which becomes the next step's input. With ``eos >= 0`` a row that has
    produced ``eos`` (``ids`` included) keeps producing it, and the loop ends once every row
    has: the number of steps run is returned."""
    nb = ids.shape[0]
    vocab = logits.shape[1]
    done = np.zeros(nb, dtype=np.bool_)
    if eos >= 0:
        for b in range(nb):
            done[b] = ids[b] == eos
    for s in range(n):
        _decode_step(w, loff, goff, heads, f, eps, ids, pos + s, kc, vc, logits, ws, threads, lora)
        finished = eos >= 0
        for b in range(nb):
            best = 0
            top = logits[b, 0]
            if top == top:
                for j in range(1, vocab):
                    v = logits[b, j]
                    if v != v:
                        best = j
                        break
                    if v > top:
                        top = v
                        best = j
            if eos >= 0:
                if done[b]:
                    best = eos
                elif best == eos:
                    done[b] = True
                finished = finished and done[b]
            out[b, s] = best
            ids[b] = best
        if finished:
            return s + 1
    return n


def workspace_size(batch: int, dim: int, ff_dim: int, heads: int, max_seq_len: int) -> int:
    """Floats of scratch one step needs (``x, x2, h, att, qkv, ff, scores``, tile, LoRA,
    X^T)."""
    panels = -(-batch // NR)
    acts = batch * (7 * dim + ff_dim + heads * max_seq_len)
    return acts + MR * NR + MAX_LORA_RANK + panels * NR * max(dim, ff_dim)


def decode_step(
    arena: np.ndarray,
    layer_offsets: np.ndarray,
    global_offsets: np.ndarray,
    heads: int,
    ff_dim: int,
    eps: float,
    ids: np.ndarray,
    pos: int,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    logits: np.ndarray,
    workspace: np.ndarray,
    threads: int,
    lora: tuple = NO_LORA,
) -> None:
    """Run one fused decode step (unchecked: the caller owns validation).

    Args:
        arena: every parameter, float32, back to back.
        layer_offsets: ``(layers, 12)`` int64 start of each ``STM_LAYOUT.layer`` entry.
        global_offsets: ``(5,)`` int64 start of each ``STM_LAYOUT.model`` entry.
        heads: attention heads.
        ff_dim: width of the MLP's hidden layer.
        eps: LayerNorm epsilon (one for every norm).
        ids: ``(batch,)`` int64 token ids.
        pos: the position being written (the cache holds ``0..pos-1``).
        k_cache, v_cache: ``(layers, batch, heads, max_seq_len, head_dim)`` float32.
        logits: ``(batch, vocab)`` float32 output.
        workspace: float32 scratch of at least :func:`workspace_size` floats.
        threads: 1 runs serially; more uses Numba's pool (sized by the caller).
        lora: ``(lora_a, lora_b, lora_t, lora_s)`` LoRA updates (module docstring), or
            :data:`NO_LORA`.
    """
    _decode_step(
        arena,
        layer_offsets,
        global_offsets,
        heads,
        ff_dim,
        np.float32(eps),
        ids,
        pos,
        k_cache,
        v_cache,
        logits,
        workspace,
        threads,
        lora,
    )


def greedy_steps(
    arena: np.ndarray,
    layer_offsets: np.ndarray,
    global_offsets: np.ndarray,
    heads: int,
    ff_dim: int,
    eps: float,
    ids: np.ndarray,
    pos: int,
    steps: int,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    logits: np.ndarray,
    workspace: np.ndarray,
    threads: int,
    out: np.ndarray,
    eos_id: int | None = None,
    lora: tuple = NO_LORA,
) -> int:
    """Up to ``steps`` greedy decode steps in one call (unchecked, like :func:`decode_step`).

    ``ids`` (``(batch,)`` int64, overwritten) is fed at ``pos``; each step's argmax is written
    to ``out[:, step]`` (``(batch, steps)`` int64) and fed at the next position. The cache
    must hold positions ``0..pos-1`` and have room up to ``pos + steps - 1``. With ``eos_id``,
    generation's stopping rule: a row that produced it repeats it, and the loop stops once
    every row has. Returns the number of steps run.
    """
    return _greedy_steps(
        arena,
        layer_offsets,
        global_offsets,
        heads,
        ff_dim,
        np.float32(eps),
        ids,
        pos,
        steps,
        k_cache,
        v_cache,
        logits,
        workspace,
        threads,
        -1 if eos_id is None else eos_id,
        out,
        lora,
    )
