"""Triton kernels for a whole one-token decode step of a Hugging Face decoder
(:class:`~ryzen_opt.optimization.fastpaths.decoder_layout.DecoderLayout`: Llama/Qwen2/Mistral
and GPT-2), written to be captured once in a CUDA graph and replayed per token.

At batch 1..16 a step reads every weight once and does almost no arithmetic with it (a 1.2B
Llama reads 2.2 GB a token in bf16), so every matmul is a bandwidth-bound GEMV or skinny
GEMM; what matters is that each launch keeps every SM streaming weights, and that there are
few launches. :func:`decoder_step` runs ``5 * layers + 1`` kernels (81 for a 16-layer model):

* ``_qkv_kernel`` (one a layer): the attention norm (statistics over the whole row in the
  prologue), the q, k and v projections in one launch, bias, rotary embedding (llama) at
  position ``t - start``, k and v stored straight into the cache at slot ``t``, q into the
  workspace. An output tile never crosses a head; its columns pair lane ``d`` with
  ``d + head_dim/2``, so rotate-half happens in registers. Layer 0 gathers the token (and
  GPT-2's learned position) embedding itself and writes the residual stream.
* ``_attention_kernel`` (one a layer): split-K "flash decoding". One program per (row, kv
  head, split); the query heads of a group share the program, so each cached key and value
  is read once (a ``[16, head_dim]`` query tile against ``[BLOCK_T, head_dim]`` keys on the
  tensor cores). Split ``s`` takes the ``s``-th share of the valid slots ``start..t`` (read
  from device memory) and leaves an fp32 partial; the last split of a (row, kv head) to
  finish merges them.
* ``_linear_kernel`` (three a layer, and the head): ``y = epilogue(norm(x) @ W.T)``. It serves
  the o projection (+ residual), the MLP's gate/up pair (two accumulators, ``silu(g) * u``)
  or GPT-2's up projection (+ bias, GELU-tanh), the down projection (+ bias + residual), and
  the final norm + LM head.

Every matmul program owns ``BLOCK_N`` output features of *every* row of the batch (the
weight tile is loaded once and applied to all rows) and streams a ``[BLOCK_N, BLOCK_K]`` weight
tile a step over its share of K. With too few feature blocks to fill the GPU, K is split:
programs leave fp32 partials and the last one of a feature block to arrive (an atomic counter
it then resets, so a graph replays it) sums them in a fixed order and runs the epilogue, so
a split matmul is still one launch and its result does not depend on arrival order. Rows up
to 4 use FMA tiles (``[rows, BLOCK_N, BLOCK_K]`` accumulated, reduced once); 5..16 rows use
``tl.dot`` with the rows padded to 16. Every tile size is chosen by :func:`_config` and
:func:`_attn_config`.

Math is fp32; every value the reference rounds to the model dtype (a linear's output, the
normed input, the residual stream, ``silu(g)``) is rounded at the same point. The position
``t`` and each row's first slot ``start`` live in device tensors, read only by the kernels:
no host synchronisation, so the step is graph-capturable. :func:`supports` says what is not
served.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ryzen_opt.kernels.triton import _common
from ryzen_opt.kernels.triton.matmul import _activate

# fmt: off
# Kernel signatures and launches keep their arguments grouped by role (pointers, sizes,
# strides, meta-parameters) on shared lines, as STYLE.md asks.

MAX_ROWS_PER_PROGRAM = 16  # rows of the batch one program serves (more rows: more programs)


@dataclass(frozen=True)
class LinearConfig:
    block_b: int  # rows a program serves (a power of two; 16 on the tl.dot path)
    block_n: int  # output features a program owns
    block_k: int  # K elements a weight tile spans
    split_k: int  # programs sharing one feature block's K
    dot: bool  # tl.dot (rows padded to 16) instead of FMA tiles
    num_warps: int = 4
    num_stages: int = 3  # software-pipelined K tiles in flight (Triton's default on CUDA)


@dataclass(frozen=True)
class AttnConfig:
    block_t: int  # cache slots a tile spans
    splits: int  # programs sharing one (row, kv head)'s slots
    num_warps: int = 4
    num_stages: int = 3


def _pow2(n: int) -> int:
    return _common.next_pow2(max(int(n), 1))


def _config(n: int, k: int, batch: int, *, sms: int = 132, accumulators: int = 1,
            transposed: bool = False, divides: int | None = None) -> LinearConfig:
    """Tiles of one matmul ``(batch, k) @ (k, n)``; ``divides``: ``block_n`` must divide it
    (QKV tiles stay inside one head); ``accumulators``: 2 for the gate/up pair.

    From a sweep of the whole step on an H200 (``python -m bench.decoder_step_tune --sweep``,
    Llama 1.2B bf16; ``bench/results/h200/decoder_step_tune-llama-1b.md``):
    * FMA path (<= 4 rows): every program requests its next weight tile before using the
      current one; ``block_k`` 1024 beat 512 (gate/up 1073 vs 1095 us a step at batch 1) and
      256 (1181 us). A program owns about 16K weights (32 KB of bf16) over all of K: the
      down projection (K 8192) ran 1003 us at 2 features against 1073 us at 4 and 1099 us
      at 8, the qkv projection (K 2048) 929 us at 8 features against 956 us at 2, the gate/up
      pair 1073 us at 4 against 1099 us at 2 and 8. Feature blocks narrow further only to
      keep 2 programs per SM (QKV tiles keep 2 lanes for the rotary pairs).
    * tl.dot path (5..16 rows): mma needs 16 rows; 32 features beat 16 on every matmul at
      batch 16 (gate/up 1116 vs 1277 us a step) and split-K fills the SMs once (o and down
      projections: 4 splits).
    * Conv1D weights (GPT-2, ``transposed``): N is the contiguous axis, so tiles are wide in N
      (64 features = 128 contiguous bytes in bf16) and short in K.
    """
    dot = batch > 4
    block_b = MAX_ROWS_PER_PROGRAM if dot else _pow2(batch)
    if transposed:
        block_k, block_n, min_n, target = 64, 64, 16, 2 * sms
    elif dot:
        block_k, block_n, min_n, target = 256, 32, 32, sms
    else:
        block_k = min(1024 if block_b <= 2 else 512, max(16, _pow2(k)))
        block_n = max(1, 16384 // (block_b * _pow2(k) * accumulators))
        min_n, target = (2 if divides is not None else 1), 2 * sms
    block_k = min(block_k, max(16, _pow2(k)))
    if divides is not None:
        block_n = min(block_n, divides & -divides)  # largest power of two dividing it
        min_n = min(min_n, block_n)
    row_groups = _common.cdiv(batch, block_b)
    while _common.cdiv(n, block_n) * row_groups < target and block_n > min_n:
        block_n //= 2
    tiles = _common.cdiv(n, block_n) * row_groups
    k_tiles = _common.cdiv(k, block_k)
    split_k = 1
    while tiles * split_k < min(target, 2 * sms) and split_k * 4 <= k_tiles:
        split_k *= 2  # >= 2 K tiles a split
    return LinearConfig(block_b, block_n, block_k, split_k, dot)


def _attn_config(batch: int, kv_heads: int, head_dim: int, t_max: int, *,
                 sms: int = 132) -> AttnConfig:
    """Slots per tile and splits of the attention. ``block_t`` 64 at head_dim <= 64 (a bf16
    K or V tile is 8 KB), 32 above; splits double until (row, kv head, split) programs reach
    half the SMs, or each split would get less than two tiles of the cache: merging splits
    costs more than it saves beyond that (batch 16, 8 kv heads, 256 slots on an H200: 1054
    us a step at 1 split, 1073 at 2, 1083 at 4)."""
    block_t = 64 if head_dim <= 64 else 32
    block_t = min(block_t, max(16, _pow2(t_max)))
    splits = 1
    while batch * kv_heads * splits < sms // 2 and splits * 2 * block_t <= t_max:
        splits *= 2
    return AttnConfig(block_t, splits)


# --- shared pieces ---------------------------------------------------------------------------


@triton.jit
def _x_raw(x_ptr, ids_ptr, emb_ptr, pe_ptr, pos, rows, row_mask, offs_k, k_mask, K,
           EMBED: tl.constexpr):
    """Input rows ``[BLOCK_B, BLOCK_K]`` in fp32: the activations, or (EMBED 1) the token
    embeddings (+ EMBED 2: learned positions) rounded as the model's own sum is."""
    mask = row_mask[:, None] & k_mask[None, :]
    if EMBED == 0:
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask,
                    other=0.0).to(tl.float32)
    else:
        tok = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        x = tl.load(emb_ptr + tok[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if EMBED == 2:
            x += tl.load(pe_ptr + pos[:, None] * K + offs_k[None, :], mask=mask,
                         other=0.0).to(tl.float32)
        x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _row_stats(x_ptr, ids_ptr, emb_ptr, pe_ptr, pos, rows, row_mask, K, eps,
               NORM: tl.constexpr, EMBED: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(mean, rstd)`` of every row over all K (RMSNorm: mean 0); two passes for LayerNorm
    so a large mean does not cancel the variance."""
    mean = tl.zeros_like(row_mask.to(tl.float32))
    if NORM == 2:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = _x_raw(x_ptr, ids_ptr, emb_ptr, pe_ptr, pos, rows, row_mask, offs_k,
                       offs_k < K, K, EMBED)
            mean += tl.sum(x, 1)
        mean = mean / K
    ss = tl.zeros_like(mean)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = _x_raw(x_ptr, ids_ptr, emb_ptr, pe_ptr, pos, rows, row_mask, offs_k, k_mask, K,
                   EMBED)
        xc = tl.where(k_mask[None, :], x - mean[:, None], 0.0)
        ss += tl.sum(xc * xc, 1)
    return mean, 1.0 / tl.sqrt(ss / K + eps)


@triton.jit
def _normalize(x, mean, rstd, nw_ptr, nb_ptr, offs_k, k_mask, NORM: tl.constexpr):
    """The normed input as the model rounds it: LayerNorm once; HF's RMSNorm rounds
    ``x * rstd`` to the dtype, then ``weight * that`` in the dtype."""
    dt = nw_ptr.dtype.element_ty
    if NORM != 0:
        w = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        if NORM == 1:
            x = (x * rstd[:, None]).to(dt).to(tl.float32) * w[None, :]
        else:
            b = tl.load(nb_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            x = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
        x = x.to(dt).to(tl.float32)
    return x


@triton.jit
def _load_w(w_ptr, offs_n, n_mask, offs_k, k_mask, so, si):
    """The weight tile ``W[offs_n, offs_k]`` (masked lanes 0)."""
    return tl.load(w_ptr + offs_n[:, None].to(tl.int64) * so + offs_k[None, :].to(tl.int64) * si,
                   mask=n_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _mac(acc, x, w, DOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc [B, N] += x [B, K] @ w [N, K].T``: tl.dot, or (few rows) FMA products reduced
    over the tile's K at once."""
    if DOT:
        a = x.to(w.dtype)
        if UPCAST:  # the interpreter multiplies bf16 tiles wrongly (_common.UPCAST_BF16_DOT)
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    else:
        acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], 2)
    return acc


@triton.jit
def _wait_prior(PDL: tl.constexpr):
    """With programmatic dependent launch: wait until the previous kernel of the step has
    finished (its stores visible), then let the next one start its own weight loads."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _arrive(cnt_ptr, SPLITS: tl.constexpr):
    """Count this program in; True for the last of ``SPLITS`` (which resets the counter for
    the next launch). The barrier orders every thread's partial stores before the release."""
    tl.debug_barrier()
    count = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    last = count == SPLITS - 1
    tl.atomic_xchg(cnt_ptr, 0, mask=last, sem="relaxed")
    return last


@triton.jit
def _partial_ptrs(part_ptr, slot, rows, offs_n, B, N):
    return part_ptr + (slot * B + rows[:, None]).to(tl.int64) * N + offs_n[None, :]


@triton.jit
def _sum_partials(part_ptr, a, rows, offs_n, mask, B, N,
                  ACCS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Accumulator ``a`` summed over the splits in a fixed order (``.cg``: from L2, where the
    other SMs' stores are)."""
    acc = tl.zeros_like(offs_n[None, :].to(tl.float32) + rows[:, None].to(tl.float32))
    for s in range(SPLIT_K):
        acc += tl.load(_partial_ptrs(part_ptr, s * ACCS + a, rows, offs_n, B, N), mask=mask,
                       other=0.0, cache_modifier=".cg")
    return acc


# --- q, k, v --------------------------------------------------------------------------------


@triton.jit
def _qkv_epilogue(acc, rows, row_mask, lane, sec, head, b_ptr, q_ptr, kc_ptr, vc_ptr, t, pos,
                  inv_freq_ptr, rope_scale, HEADS, KV_HEADS, T_MAX, HEAD_DIM,
                  HAS_BIAS: tl.constexpr, ROPE: tl.constexpr, BLOCK_N: tl.constexpr):
    dt = q_ptr.dtype.element_ty
    feat = head * HEAD_DIM + lane
    if HAS_BIAS:
        acc += tl.load(b_ptr + feat).to(tl.float32)[None, :]
    y = acc.to(dt).to(tl.float32)  # the projection's output, in the model dtype
    if ROPE:
        # Columns [0, BLOCK_N/2) hold lanes d, the rest d + head_dim/2: rotate_half swaps the
        # halves (and negates the first).
        HALF: tl.constexpr = BLOCK_N // 2
        BLOCK_B: tl.constexpr = acc.shape[0]
        lo, hi = tl.split(tl.permute(tl.reshape(y, [BLOCK_B, 2, HALF]), (0, 2, 1)))
        rot = tl.reshape(tl.permute(tl.join(-hi, lo), (0, 2, 1)), [BLOCK_B, BLOCK_N])
        freq = tl.load(inv_freq_ptr + lane % (HEAD_DIM // 2))
        ang = pos.to(tl.float32)[:, None] * freq[None, :]
        cos = (tl.cos(ang) * rope_scale).to(dt).to(tl.float32)
        sin = (tl.sin(ang) * rope_scale).to(dt).to(tl.float32)
        y = tl.where(sec < 2, y * cos + rot * sin, y)
    mask = row_mask[:, None] & (lane >= 0)[None, :]
    if sec == 0:
        tl.store(q_ptr + rows[:, None] * (HEADS * HEAD_DIM) + feat[None, :], y.to(dt),
                 mask=mask)
    else:
        cache = (((rows[:, None].to(tl.int64) * KV_HEADS + head) * T_MAX + t) * HEAD_DIM
                 + lane[None, :])
        if sec == 1:
            tl.store(kc_ptr + cache, y.to(kc_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(vc_ptr + cache, y.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_kernel(
    # pointers
    x_ptr, nw_ptr, nb_ptr, wq_ptr, wk_ptr, wv_ptr, bq_ptr, bk_ptr, bv_ptr, q_ptr, kc_ptr,
    vc_ptr, t_ptr, start_ptr, ids_ptr, emb_ptr, pe_ptr, inv_freq_ptr, part_ptr, cnt_ptr,
    # sizes and scalars
    B, K, K_PER, HEADS, KV_HEADS, T_MAX, HEAD_DIM, eps, rope_scale,
    # strides (out, in) of each weight
    sq_o, sq_i, sk_o, sk_i, sv_o, sv_i,
    # meta-parameters
    NORM: tl.constexpr, EMBED: tl.constexpr, HAS_BIAS: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    pid_n, pid_k, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # Feature block -> (section: q 0, k 1, v 2; head in it; lanes of the head).
    per_head = HEAD_DIM // BLOCK_N
    hg = pid_n // per_head
    j = pid_n % per_head
    i = tl.arange(0, BLOCK_N)
    if ROPE:
        lane = j * (BLOCK_N // 2) + i % (BLOCK_N // 2) + (i // (BLOCK_N // 2)) * (HEAD_DIM // 2)
    else:
        lane = j * BLOCK_N + i
    sec = (hg >= HEADS).to(tl.int32) + (hg >= HEADS + KV_HEADS).to(tl.int32)
    head = hg - tl.where(sec == 0, 0, tl.where(sec == 1, HEADS, HEADS + KV_HEADS))
    if sec == 0:
        w_ptr, b_ptr, so, si = wq_ptr, bq_ptr, sq_o, sq_i
    elif sec == 1:
        w_ptr, b_ptr, so, si = wk_ptr, bk_ptr, sk_o, sk_i
    else:
        w_ptr, b_ptr, so, si = wv_ptr, bv_ptr, sv_o, sv_i
    offs_n = head * HEAD_DIM + lane
    n_mask = lane >= 0

    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    # The first weight tile is requested before waiting on the previous kernel (weights never
    # depend on it); each iteration then requests the next tile before using the current one.
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    w = _load_w(w_ptr, offs_n, n_mask, offs_k, offs_k < k_hi, so, si)
    _wait_prior(PDL)
    t = tl.load(t_ptr)
    pos = t - tl.load(start_ptr + rows, mask=row_mask, other=0)
    mean = tl.zeros([BLOCK_B], dtype=tl.float32)
    rstd = mean
    if NORM != 0:
        mean, rstd = _row_stats(x_ptr, ids_ptr, emb_ptr, pe_ptr, pos, rows, row_mask, K, eps,
                                NORM, EMBED, BLOCK_S)
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        w_next = _load_w(w_ptr, offs_n, n_mask, offs_k + BLOCK_K, offs_k + BLOCK_K < k_hi, so,
                         si)
        x = _x_raw(x_ptr, ids_ptr, emb_ptr, pe_ptr, pos, rows, row_mask, offs_k, k_mask, K,
                   EMBED)
        if EMBED != 0:  # noqa: SIM102 (constexpr, then runtime)
            if pid_n == 0:  # layer 0 starts the residual stream (feature block 0 writes it)
                tl.store(x_ptr + rows[:, None] * K + offs_k[None, :],
                         x.to(x_ptr.dtype.element_ty), mask=row_mask[:, None] & k_mask[None, :])
        x = _normalize(x, mean, rstd, nw_ptr, nb_ptr, offs_k, k_mask, NORM)
        acc = _mac(acc, x, w, DOT, UPCAST, DOT_PRECISION)
        w = w_next
    if SPLIT_K > 1:
        mask = row_mask[:, None] & n_mask[None, :]
        N_ALL = (HEADS + 2 * KV_HEADS) * HEAD_DIM
        cols = pid_n * BLOCK_N + i
        tl.store(_partial_ptrs(part_ptr, pid_k, rows, cols, B, N_ALL), acc, mask=mask)
        if _arrive(cnt_ptr + pid_b * tl.num_programs(0) + pid_n, SPLIT_K):
            acc = _sum_partials(part_ptr, 0, rows, cols, mask, B, N_ALL, 1, SPLIT_K)
            _qkv_epilogue(acc, rows, row_mask, lane, sec, head, b_ptr, q_ptr, kc_ptr, vc_ptr,
                          t, pos, inv_freq_ptr, rope_scale, HEADS, KV_HEADS, T_MAX, HEAD_DIM,
                          HAS_BIAS, ROPE, BLOCK_N)
    else:
        _qkv_epilogue(acc, rows, row_mask, lane, sec, head, b_ptr, q_ptr, kc_ptr, vc_ptr, t,
                      pos, inv_freq_ptr, rope_scale, HEADS, KV_HEADS, T_MAX, HEAD_DIM,
                      HAS_BIAS, ROPE, BLOCK_N)


# --- attention ------------------------------------------------------------------------------


@triton.jit
def _attention_kernel(
    # pointers
    q_ptr, kc_ptr, vc_ptr, t_ptr, start_ptr, y_ptr, part_o_ptr, part_ml_ptr, cnt_ptr,
    # sizes and scalars
    HEADS, KV_HEADS, GROUP, T_MAX, HEAD_DIM, scale,
    # meta-parameters
    SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    b, kvh, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _wait_prior(PDL)
    t = tl.load(t_ptr)
    lo = tl.load(start_ptr + b)
    # This split's share of the valid slots lo..t, in whole tiles.
    chunk = tl.cdiv(tl.cdiv(t - lo + 1, SPLITS), BLOCK_T) * BLOCK_T
    s_lo = lo + sp * chunk
    s_hi = tl.minimum(s_lo + chunk, t + 1)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    qd_mask = g_mask[:, None] & d_mask[None, :]
    q_off = b * HEADS * HEAD_DIM + (kvh * GROUP + offs_g[:, None]) * HEAD_DIM + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    base = (b * KV_HEADS + kvh).to(tl.int64) * T_MAX * HEAD_DIM
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_T):
        offs_t = s0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < s_hi
        kv_off = base + offs_t[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds slot s0
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0)
        pv = p.to(v.dtype)
        if UPCAST:
            pv, v = pv.to(tl.float32), v.to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PRECISION)
        m_i = m_new
    y_off = q_off
    if SPLITS > 1:
        # Partials of (b, kvh): [SPLITS, BLOCK_G, BLOCK_D] outputs and [SPLITS, 2, BLOCK_G]
        # (max, sum); an empty split leaves (-inf, 0, 0), which weighs nothing below.
        pair = b * KV_HEADS + kvh
        o_base = pair.to(tl.int64) * SPLITS * BLOCK_G * BLOCK_D
        tile = offs_g[:, None] * BLOCK_D + offs_d[None, :]
        ml_base = pair.to(tl.int64) * SPLITS * 2 * BLOCK_G
        tl.store(part_o_ptr + o_base + sp * BLOCK_G * BLOCK_D + tile, acc)
        tl.store(part_ml_ptr + ml_base + sp * 2 * BLOCK_G + offs_g, m_i)
        tl.store(part_ml_ptr + ml_base + sp * 2 * BLOCK_G + BLOCK_G + offs_g, l_i)
        if _arrive(cnt_ptr + pair, SPLITS):
            m_all = tl.full([BLOCK_G], float("-inf"), tl.float32)
            for s in range(SPLITS):
                m_all = tl.maximum(m_all, tl.load(part_ml_ptr + ml_base + s * 2 * BLOCK_G
                                                  + offs_g, cache_modifier=".cg"))
            out = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
            l_all = tl.zeros([BLOCK_G], dtype=tl.float32)
            for s in range(SPLITS):
                m_s = tl.load(part_ml_ptr + ml_base + s * 2 * BLOCK_G + offs_g,
                              cache_modifier=".cg")
                l_s = tl.load(part_ml_ptr + ml_base + s * 2 * BLOCK_G + BLOCK_G + offs_g,
                              cache_modifier=".cg")
                w = tl.exp(m_s - m_all)
                l_all += l_s * w
                out += w[:, None] * tl.load(part_o_ptr + o_base + s * BLOCK_G * BLOCK_D + tile,
                                            cache_modifier=".cg")
            tl.store(y_ptr + y_off, (out / l_all[:, None]).to(y_ptr.dtype.element_ty),
                     mask=qd_mask)
    else:
        tl.store(y_ptr + y_off, (acc / l_i[:, None]).to(y_ptr.dtype.element_ty), mask=qd_mask)


# --- the other matmuls ----------------------------------------------------------------------


@triton.jit
def _linear_epilogue(acc1, acc2, rows, offs_n, mask, b1_ptr, b2_ptr, res_ptr, out_ptr, N,
                     ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    dt = out_ptr.dtype.element_ty
    n_mask = offs_n < N
    if HAS_BIAS:
        acc1 += tl.load(b1_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = acc1.to(dt).to(tl.float32)
    if ACT == 3:  # silu(gate) * up, each rounded as the model's ops round them
        if HAS_BIAS:
            acc2 += tl.load(b2_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        u = acc2.to(dt).to(tl.float32)
        y = _activate(y, 3).to(dt).to(tl.float32) * u
    elif ACT == 2:
        y = _activate(y, 2)
    off = rows[:, None].to(tl.int64) * N + offs_n[None, :]
    if HAS_RES:
        y = y.to(dt).to(tl.float32) + tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, y.to(dt), mask=mask)


@triton.jit
def _linear_kernel(
    # pointers
    x_ptr, nw_ptr, nb_ptr, w1_ptr, w2_ptr, b1_ptr, b2_ptr, res_ptr, out_ptr, part_ptr, cnt_ptr,
    # sizes and scalars
    B, N, K, K_PER, eps,
    # strides (out, in) of each weight
    s1_o, s1_i, s2_o, s2_i,
    # meta-parameters
    NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    pid_n, pid_k, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    GATED: tl.constexpr = ACT == 3
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    # Weight tiles requested ahead, as in _qkv_kernel.
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    w1 = _load_w(w1_ptr, offs_n, n_mask, offs_k, offs_k < k_hi, s1_o, s1_i)
    w2 = w1
    if GATED:
        w2 = _load_w(w2_ptr, offs_n, n_mask, offs_k, offs_k < k_hi, s2_o, s2_i)
    _wait_prior(PDL)
    mean = tl.zeros([BLOCK_B], dtype=tl.float32)
    rstd = mean
    if NORM != 0:
        mean, rstd = _row_stats(x_ptr, x_ptr, x_ptr, x_ptr, rows, rows, row_mask, K, eps,
                                NORM, 0, BLOCK_S)
    acc1 = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    acc2 = acc1
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        nk = offs_k + BLOCK_K
        w1_next = _load_w(w1_ptr, offs_n, n_mask, nk, nk < k_hi, s1_o, s1_i)
        w2_next = w1_next
        if GATED:
            w2_next = _load_w(w2_ptr, offs_n, n_mask, nk, nk < k_hi, s2_o, s2_i)
        x = _x_raw(x_ptr, x_ptr, x_ptr, x_ptr, rows, rows, row_mask, offs_k, k_mask, K, 0)
        x = _normalize(x, mean, rstd, nw_ptr, nb_ptr, offs_k, k_mask, NORM)
        acc1 = _mac(acc1, x, w1, DOT, UPCAST, DOT_PRECISION)
        if GATED:
            acc2 = _mac(acc2, x, w2, DOT, UPCAST, DOT_PRECISION)
        w1, w2 = w1_next, w2_next
    mask = row_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        ACCS: tl.constexpr = 2 if GATED else 1
        tl.store(_partial_ptrs(part_ptr, pid_k * ACCS, rows, offs_n, B, N), acc1, mask=mask)
        if GATED:
            tl.store(_partial_ptrs(part_ptr, pid_k * ACCS + 1, rows, offs_n, B, N), acc2,
                     mask=mask)
        if _arrive(cnt_ptr + pid_b * tl.num_programs(0) + pid_n, SPLIT_K):
            acc1 = _sum_partials(part_ptr, 0, rows, offs_n, mask, B, N, ACCS, SPLIT_K)
            if GATED:
                acc2 = _sum_partials(part_ptr, 1, rows, offs_n, mask, B, N, ACCS, SPLIT_K)
            _linear_epilogue(acc1, acc2, rows, offs_n, mask, b1_ptr, b2_ptr, res_ptr, out_ptr,
                             N, ACT, HAS_BIAS, HAS_RES)
    else:
        _linear_epilogue(acc1, acc2, rows, offs_n, mask, b1_ptr, b2_ptr, res_ptr, out_ptr, N,
                         ACT, HAS_BIAS, HAS_RES)


# fmt: on
# --- host side ------------------------------------------------------------------------------

_NORM_KIND = {"rms": 1, "layer": 2}


def supports(layout) -> str | None:
    """``None`` if :func:`decoder_step` serves ``layout`` (a ``DecoderLayout``), else why not."""
    reason = _common.available()
    if reason is not None:
        return reason
    if layout.device.type not in _common.DEVICES:
        return f"the model is on {layout.device}; the triton decoder step needs CUDA"
    if layout.dtype not in _common.KERNEL_DTYPES:
        return f"dtype {layout.dtype} is not one of float32, float16, bfloat16"
    if layout.family not in ("llama", "gpt2"):
        return f"family {layout.family!r} has no triton decoder step"
    if layout.activation not in ("silu_gate", "gelu_tanh"):
        return f"activation {layout.activation!r} is not implemented"
    if layout.head_dim % 16:
        return f"head_dim {layout.head_dim} is not a multiple of 16 (the tl.dot tiles' minimum)"
    if layout.heads % layout.kv_heads:
        return f"heads {layout.heads} is not a multiple of kv_heads {layout.kv_heads}"
    if (layout.family == "llama") != (layout.rope_inv_freq is not None):
        return "rotary embeddings are served for the llama family only (and it needs them)"
    if layout.embed.stride() != (layout.hidden, 1) or (
        layout.pos_embed is not None and layout.pos_embed.stride() != (layout.hidden, 1)
    ):
        return "the embedding tables are not contiguous"
    norms = [layout.final_norm] + [n for ly in layout.layers for n in (ly.attn_norm, ly.mlp_norm)]
    for norm in norms:
        if norm.kind not in _NORM_KIND or not norm.weight.is_contiguous():
            return f"norm kind {norm.kind!r} (or a strided norm weight) is not implemented"
    return None


class DecoderWorkspace:
    """The activations of one batch size's step, allocated once (a CUDA graph needs fixed
    addresses), and the tiles every launch uses.

    Args:
        layout: the model's :class:`DecoderLayout`.
        batch: rows per step.
        config, attn_config: tile choosers with :func:`_config`'s and :func:`_attn_config`'s
            signatures (tests force split-K and small tiles through them).
        pdl: launch with programmatic dependent launch (sm90+; measured slower, see below).
    """

    def __init__(
        self, layout, batch: int, *, config=_config, attn_config=_attn_config, pdl: bool = False
    ):
        reason = supports(layout)
        if reason is not None:
            raise ValueError(f"layout: {reason}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        lay = self.layout = layout
        self.batch = b = batch
        dev, dt = layout.device, layout.dtype
        sms = _common.num_sms(_common.device_index(layout.embed))
        # Programmatic dependent launch (``pdl=True``, sm90+): each kernel's programs start
        # while the previous kernel finishes and request their first weight tiles before
        # waiting for its results. Off by default: measured slower on an H200 (Llama 1.2B
        # bf16 step: 988 vs 944 us at batch 1, 1138 vs 1098 us at batch 16,
        # bench/results/h200/decoder_step_tune-llama-1b-pdl.md; not yet explained: waiting
        # programs holding SM slots is one candidate).
        if pdl and not _common.pdl_supported(_common.device_index(layout.embed)):
            raise ValueError("pdl: programmatic dependent launch needs an sm90+ GPU")
        self.pdl = bool(pdl)
        self.launch = {"launch_pdl": True} if self.pdl else {}
        qd, kvd = lay.heads * lay.head_dim, lay.kv_heads * lay.head_dim
        layer = lay.layers[0]

        def buf(n, dtype=dt):
            return torch.empty(b, n, device=dev, dtype=dtype)

        self.x, self.q, self.y = buf(lay.hidden), buf(qd), buf(qd)
        self.mid, self.logits = buf(lay.intermediate), buf(lay.vocab)
        gated = lay.activation == "silu_gate"
        self.cfg = {
            "qkv": config(
                qd + 2 * kvd,
                lay.hidden,
                b,
                sms=sms,
                divides=lay.head_dim,
                transposed=layer.q.transposed,
            ),
            "o": config(lay.hidden, qd, b, sms=sms, transposed=layer.o.transposed),
            "up": config(
                lay.intermediate,
                lay.hidden,
                b,
                sms=sms,
                accumulators=2 if gated else 1,
                transposed=layer.up.transposed,
            ),
            "down": config(
                lay.hidden, lay.intermediate, b, sms=sms, transposed=layer.down.transposed
            ),
            "head": config(lay.vocab, lay.hidden, b, sms=sms, transposed=lay.head.transposed),
        }
        qkv = self.cfg["qkv"]
        if lay.head_dim % qkv.block_n or (lay.rope_inv_freq is not None and qkv.block_n < 2):
            raise ValueError(
                f"config: qkv block_n {qkv.block_n} must divide head_dim "
                f"{lay.head_dim} (and be >= 2 with rotary embeddings)"
            )
        n_of = {
            "qkv": qd + 2 * kvd,
            "o": lay.hidden,
            "up": lay.intermediate,
            "down": lay.hidden,
            "head": lay.vocab,
        }
        part, tiles = 1, 1
        for name, c in self.cfg.items():
            if c.dot and (c.block_b < 16 or c.block_n < 16 or c.block_k < 16):
                raise ValueError(f"config: {name} uses tl.dot with a tile side under 16: {c}")
            accs = 2 if name == "up" and gated else 1
            if c.split_k > 1:
                part = max(part, c.split_k * accs * b * n_of[name])
            tiles = max(tiles, _common.cdiv(n_of[name], c.block_n) * _common.cdiv(b, c.block_b))
        self.attn = attn_config(b, lay.kv_heads, lay.head_dim, 0, sms=sms)  # see bind()
        self._attn_config, self._sms = attn_config, sms
        self.partials = torch.empty(part, device=dev, dtype=torch.float32)
        # Split counters: zero, and every launch leaves them zero (the last program resets).
        self.counters = torch.zeros(max(tiles, b * lay.kv_heads), device=dev, dtype=torch.int32)
        self.block_g = max(16, _pow2(lay.heads // lay.kv_heads))
        self._attn_parts_for = None
        self.qkv_bias = self._qkv_bias()

    def _qkv_bias(self):
        """q/k/v biases per layer, zeros standing in for a missing one when others exist."""
        out = []
        for ly in self.layout.layers:
            lins = (ly.q, ly.k, ly.v)
            if all(lin.bias is None for lin in lins):
                out.append(None)
                continue
            out.append(
                tuple(
                    lin.bias
                    if lin.bias is not None
                    else torch.zeros(
                        lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype
                    )
                    for lin in lins
                )
            )
        return out

    def bind(self, t_max: int) -> AttnConfig:
        """The attention tiles for a cache of ``t_max`` slots (chosen on the first step and
        kept: a graph replays with the same cache)."""
        if self._attn_parts_for != t_max:
            lay, b = self.layout, self.batch
            self.attn = self._attn_config(b, lay.kv_heads, lay.head_dim, t_max, sms=self._sms)
            n = b * lay.kv_heads * self.attn.splits * self.block_g
            dev = lay.device
            self.attn_o = torch.empty(n * _pow2(lay.head_dim), device=dev, dtype=torch.float32)
            self.attn_ml = torch.empty(n * 2, device=dev, dtype=torch.float32)
            self._attn_parts_for = t_max
        return self.attn


def _grid(c: LinearConfig, n_blocks: int, batch: int):
    return (n_blocks, c.split_k, _common.cdiv(batch, c.block_b))


def _stats_block(k: int, c: LinearConfig) -> int:
    """K elements a norm-statistics load spans: the whole row in one load where it fits
    (one round trip before the first product instead of ``k / block_k``), within 4096
    elements of fp32 registers over the program's rows."""
    return max(c.block_k, min(_pow2(k), 4096 // c.block_b))


def _k_per(c: LinearConfig, k: int) -> int:
    return _common.cdiv(_common.cdiv(k, c.block_k), c.split_k) * c.block_k


def _norm_args(norm, fallback):
    kind = _NORM_KIND[norm.kind]
    return kind, norm.weight, norm.bias if norm.bias is not None else fallback


def _linear(ws, c: LinearConfig, x, lin1, out, *, lin2=None, norm=None, act=0, res=None):
    n, k = lin1.out_features, lin1.in_features
    w1 = lin1.weight
    kind, nw, nb = _norm_args(norm, w1) if norm is not None else (0, w1, w1)
    lin2 = lin2 if lin2 is not None else lin1
    has_bias = lin1.bias is not None
    if act == 3 and (lin2.bias is not None) != has_bias:
        raise ValueError("gate and up projections must both have a bias or neither")
    (s1o, s1i), (s2o, s2i) = lin1.strides(), lin2.strides()
    dt = w1.dtype
    # fmt: off
    _linear_kernel[_grid(c, _common.cdiv(n, c.block_n), ws.batch)](
        x, nw, nb, w1, lin2.weight, lin1.bias if has_bias else w1,
        lin2.bias if lin2.bias is not None else w1, res if res is not None else out, out,
        ws.partials, ws.counters,
        ws.batch, n, k, _k_per(c, k), norm.eps if norm is not None else 0.0,
        s1o, s1i, s2o, s2i,
        NORM=kind, ACT=act, HAS_BIAS=has_bias, HAS_RES=res is not None,
        BLOCK_B=c.block_b, BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT_K=c.split_k, DOT=c.dot,
        UPCAST=_common.upcast_dot(dt), DOT_PRECISION=_common.dot_precision(dt),
        BLOCK_S=_stats_block(k, c), PDL=ws.pdl, num_warps=c.num_warps,
        num_stages=c.num_stages, **ws.launch,
    )
    # fmt: on
    return out


def decoder_step(layout, ids, k_cache, v_cache, t, start, ws: DecoderWorkspace):
    """Logits ``(batch, vocab)`` of one token per row (``ws.logits``); writes slot ``t`` of the
    caches. The semantics and conventions of ``decoder_layout.reference_step``; no host reads
    of ``t`` or ``start`` (CUDA-graph capturable).

    Args:
        layout: the model's :class:`DecoderLayout` (the one ``ws`` was built for).
        ids: ``(batch,)`` int64 token ids.
        k_cache, v_cache: ``(layers, batch, kv_heads, T, head_dim)``, contiguous, model dtype.
        t: ``(1,)`` int64, the slot written (every row); start: ``(batch,)`` int64, each row's
            first valid slot (position id ``t - start``; slots ``start..t`` attended).
        ws: the step's :class:`DecoderWorkspace`.

    Example:
        >>> ws = DecoderWorkspace(lay, batch=4)
        >>> logits = decoder_step(lay, ids, k_cache, v_cache, t, start, ws)
    """
    lay = layout
    if ws.layout is not lay:
        raise ValueError("ws: built for another layout")
    b = ws.batch
    shape = (lay.num_layers, b, lay.kv_heads, k_cache.shape[3], lay.head_dim)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if tuple(c.shape) != shape or c.dtype != lay.dtype or not c.is_contiguous():
            raise ValueError(
                f"{name}: expected contiguous {shape} {lay.dtype}, got {tuple(c.shape)} {c.dtype}"
            )
        _common.check_device(name, c)
    for name, x, n in (("ids", ids, b), ("t", t, 1), ("start", start, b)):
        if tuple(x.shape) != (n,) or x.dtype != torch.int64:
            raise ValueError(f"{name}: expected ({n},) int64, got {tuple(x.shape)} {x.dtype}")
    t_max = k_cache.shape[3]
    ac = ws.bind(t_max)
    dt = lay.dtype
    upcast, prec = _common.upcast_dot(dt), _common.dot_precision(dt)
    qc = ws.cfg["qkv"]
    nq = (lay.heads + 2 * lay.kv_heads) * lay.head_dim
    w = lay.embed
    for i, layer in enumerate(lay.layers):
        kind, nw, nb = _norm_args(layer.attn_norm, w)
        bias = ws.qkv_bias[i]
        bq, bk, bv = bias if bias is not None else (w, w, w)
        embed = 0 if i else (2 if lay.pos_embed is not None else 1)
        (sqo, sqi), (sko, ski), (svo, svi) = (x.strides() for x in (layer.q, layer.k, layer.v))
        # fmt: off
        _qkv_kernel[_grid(qc, nq // qc.block_n, b)](
            ws.x, nw, nb, layer.q.weight, layer.k.weight, layer.v.weight, bq, bk, bv, ws.q,
            k_cache[i], v_cache[i], t, start, ids, lay.embed,
            lay.pos_embed if lay.pos_embed is not None else w,
            lay.rope_inv_freq if lay.rope_inv_freq is not None else w, ws.partials, ws.counters,
            b, lay.hidden, _k_per(qc, lay.hidden), lay.heads, lay.kv_heads, t_max, lay.head_dim,
            layer.attn_norm.eps, lay.rope_scale,
            sqo, sqi, sko, ski, svo, svi,
            NORM=kind, EMBED=embed, HAS_BIAS=bias is not None,
            ROPE=lay.rope_inv_freq is not None, BLOCK_B=qc.block_b, BLOCK_N=qc.block_n,
            BLOCK_K=qc.block_k, SPLIT_K=qc.split_k, DOT=qc.dot, UPCAST=upcast,
            DOT_PRECISION=prec, BLOCK_S=_stats_block(lay.hidden, qc), PDL=ws.pdl,
            num_warps=qc.num_warps, num_stages=qc.num_stages, **ws.launch,
        )
        _attention_kernel[(b, lay.kv_heads, ac.splits)](
            ws.q, k_cache[i], v_cache[i], t, start, ws.y, ws.attn_o, ws.attn_ml, ws.counters,
            lay.heads, lay.kv_heads, lay.heads // lay.kv_heads, t_max, lay.head_dim,
            lay.attn_scale,
            SPLITS=ac.splits, BLOCK_G=ws.block_g, BLOCK_T=ac.block_t,
            BLOCK_D=_pow2(lay.head_dim), UPCAST=upcast, DOT_PRECISION=prec, PDL=ws.pdl,
            num_warps=ac.num_warps, num_stages=ac.num_stages, **ws.launch,
        )
        # fmt: on
        _linear(ws, ws.cfg["o"], ws.y, layer.o, ws.x, res=ws.x)
        if lay.activation == "silu_gate":
            _linear(
                ws,
                ws.cfg["up"],
                ws.x,
                layer.gate,
                ws.mid,
                lin2=layer.up,
                norm=layer.mlp_norm,
                act=3,
            )
        else:
            _linear(ws, ws.cfg["up"], ws.x, layer.up, ws.mid, norm=layer.mlp_norm, act=2)
        _linear(ws, ws.cfg["down"], ws.mid, layer.down, ws.x, res=ws.x)
    return _linear(ws, ws.cfg["head"], ws.x, lay.head, ws.logits, norm=lay.final_norm)


__all__ = ["DecoderWorkspace", "decoder_step", "supports"]
