"""Triton kernels for a whole one-token decode step of the ``SimpleTransformerModel`` family.

A decode step of a small model is a chain of tiny ops; replayed from a CUDA graph it is
bound by the number of kernels, not by their work (the 2-layer, 256-wide baseline runs some
35 of them). :func:`decode_step` runs the step in ``5 * layers + 1`` kernels:

* ``_row_linear_kernel`` (four uses per layer and the head): ``y = act(LN(x) @ W.T + b) + r``
  with the LayerNorm, bias, exact GELU and residual each optional. Every program owns a block
  of output features, holds its ``[BLOCK_N, K]`` weight tile in registers and applies it to
  every row, re-normalising the (short) input row itself, so LayerNorm needs no kernel of
  its own. In its ``QKV`` form it writes the key and value straight into the KV cache at the
  position read from device memory (no separate cache-write kernels); in the first layer it
  also gathers the embeddings ``x = tok_emb[ids] + pos_emb[pos]`` itself.
* ``_attend_kernel``: one program per (row, head), a causal softmax over cached keys
  ``0..pos`` (online softmax over key tiles), fp32 math.

Unmerged LoRA adapters (``lora=``, :class:`LoraSlot` per wrapped linear) are added inside
the linear kernel that owns the layer: ``y += scale[a] * B[a] (A[a] x)`` on the (normalised)
input row, before the GELU, the residual and the KV-cache write, with ``a`` the row's adapter
read from device memory (-1: none). The adapter of each row, the scales, the rank and the
A/B tables are device data, so a captured graph keeps serving after an adapter switch or a
new mixed batch: only the tables' contents change.

The position lives in a device tensor, so one CUDA-graph capture serves every position.
Inputs and weights may be float32, float16 or bfloat16; the math is float32. Sizes are
bounded (features <= 4096 so a weight tile fits in registers); :func:`supports` says why not.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ryzen_opt.kernels.triton import _common
from ryzen_opt.kernels.triton.matmul import _activate

# fmt: off
# Kernel signatures and launches keep their arguments grouped by role (pointers, sizes,
# strides, meta-parameters) on shared lines, as STYLE.md asks.

MAX_FEATURES = 4096
# Elements of one program's weight tile: 8192 fp32 are 64 registers a thread at 4 warps.
_TILE = 8192
_ATTN_KEYS = 64  # keys per attention tile
# One row a program: measured best on an H200 at batch 1, 4 and 16 (graph replay 33 / 40 /
# 51 us against 73 / 50 / 74 us with 4 rows).
ROWS_PER_PROGRAM = 1


@triton.jit
def _lora_delta(y, x, r, offs_n, n_mask, offs_k, k_mask, la_ptr, lb_ptr, ls_ptr, lrow_ptr,
                lrank_ptr, N, K, LORA_N, LORA_R, CHUNK: tl.constexpr):
    """``y + scale[a] * B[a] (A[a] x)`` for row ``r``'s adapter ``a`` (none: ``y``). ``A`` is
    ``(LORA_N, LORA_R, K)``, ``B`` stored transposed ``(LORA_N, LORA_R, N)``; the first
    ``rank`` (read from memory) of the ``LORA_R`` rows are used, ``CHUNK`` rank rows at a
    time: a shrink of the input row against ``[CHUNK, K]`` of A, an expand of this program's
    block of features by ``[CHUNK, BLOCK_N]`` of B."""
    a = tl.load(lrow_ptr + r)
    if (a >= 0) & (a < LORA_N):
        rank = tl.load(lrank_ptr)
        base_a = a.to(tl.int64) * LORA_R * K
        base_b = a.to(tl.int64) * LORA_R * N
        offs_c = tl.arange(0, CHUNK)
        d = tl.zeros_like(y)
        for j0 in range(0, rank, CHUNK):
            rows_c = j0 + offs_c
            c_mask = rows_c < rank
            at = tl.load(la_ptr + base_a + rows_c[:, None] * K + offs_k[None, :],
                         mask=c_mask[:, None] & k_mask[None, :], other=0.0)
            t = tl.sum(at.to(tl.float32) * x[None, :], 1)
            bt = tl.load(lb_ptr + base_b + rows_c[None, :] * N + offs_n[:, None],
                         mask=n_mask[:, None] & c_mask[None, :], other=0.0)
            d += tl.sum(bt.to(tl.float32) * t[None, :], 1)
        y += d * tl.load(ls_ptr + a).to(tl.float32)
    return y


@triton.jit
def _row_linear_kernel(
    # pointers (unused ones may be any tensor: the flags keep them unread)
    x_ptr, lnw_ptr, lnb_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, k_ptr, v_ptr, pos_ptr,
    ids_ptr, tok_ptr, pe_ptr, la_ptr, lb_ptr, ls_ptr, lrow_ptr, lrank_ptr,
    # sizes
    ROWS, ROWS_PER_PROGRAM, N, K, eps, C, HEADS, T_MAX, HEAD_DIM, LORA_N, LORA_R,
    # meta-parameters
    HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr,
    QKV: tl.constexpr, EMBED: tl.constexpr, LORA: tl.constexpr, LORA_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
                mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_LN:
        gamma = tl.load(lnw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        beta = tl.load(lnb_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    if QKV or EMBED:
        pos = tl.load(pos_ptr).to(tl.int64)
    if QKV:
        # Output feature n: q for n < C, k for C <= n < 2C, v above; head and lane of k/v.
        j = offs_n % C
        head = (j // HEAD_DIM).to(tl.int64)
        lane = j % HEAD_DIM
    r0 = tl.program_id(1) * ROWS_PER_PROGRAM
    for r in range(r0, min(r0 + ROWS_PER_PROGRAM, ROWS)):
        if EMBED:  # x = tok_emb[ids[r]] + pos_emb[pos], written out once (by column block 0)
            tok = tl.load(ids_ptr + r).to(tl.int64)
            x = (tl.load(tok_ptr + tok * K + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                 + tl.load(pe_ptr + pos * K + offs_k, mask=k_mask, other=0.0).to(tl.float32))
            x = x.to(x_ptr.dtype.element_ty)  # the rounding the model's own sum has
            if tl.program_id(0) == 0:
                tl.store(x_ptr + r * K + offs_k, x, mask=k_mask)
            x = x.to(tl.float32)
        else:
            x = tl.load(x_ptr + r * K + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        if HAS_LN:
            mean = tl.sum(x, 0) / K
            xc = tl.where(k_mask, x - mean, 0.0)
            var = tl.sum(xc * xc, 0) / K
            x = xc * (1.0 / tl.sqrt(var + eps)) * gamma + beta
        y = tl.sum(w * x[None, :], 1)
        if LORA:
            y = _lora_delta(y, x, r, offs_n, n_mask, offs_k, k_mask, la_ptr, lb_ptr, ls_ptr,
                            lrow_ptr, lrank_ptr, N, K, LORA_N, LORA_R, LORA_CHUNK)
        if HAS_BIAS:
            y += bias
        if GELU:
            y = _activate(y, 1)  # the matmul epilogue's GELU (erf), -inf included
        if HAS_RES:
            y += tl.load(res_ptr + r * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if QKV:
            tl.store(out_ptr + r * C + offs_n, y.to(out_ptr.dtype.element_ty),
                     mask=n_mask & (offs_n < C))
            cache = ((r * HEADS + head) * T_MAX + pos) * HEAD_DIM + lane
            tl.store(k_ptr + cache, y.to(k_ptr.dtype.element_ty),
                     mask=n_mask & (offs_n >= C) & (offs_n < 2 * C))
            tl.store(v_ptr + cache, y.to(v_ptr.dtype.element_ty), mask=n_mask & (offs_n >= 2 * C))
        else:
            tl.store(out_ptr + r * N + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _attend_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, y_ptr,
    C, HEADS, T_MAX, HEAD_DIM, scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # r * HEADS + head
    r = row // HEADS
    head = row % HEADS
    pos = tl.load(pos_ptr).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t0 = tl.arange(0, BLOCK_T)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + r * C + head * HEAD_DIM + offs_d, mask=d_mask, other=0.0)
    q = q.to(tl.float32) * scale
    base = row.to(tl.int64) * T_MAX * HEAD_DIM
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, pos + 1, BLOCK_T):
        offs_t = start + offs_t0
        t_mask = offs_t <= pos
        kv_mask = t_mask[:, None] & d_mask[None, :]
        ptrs = base + offs_t[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + ptrs, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.where(t_mask, tl.sum(k * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))  # finite: every tile holds key `start`
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_ptr + ptrs, mask=kv_mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    tl.store(y_ptr + r * C + head * HEAD_DIM + offs_d, (acc / l_i).to(y_ptr.dtype.element_ty),
             mask=d_mask)


# (out_features, in_features) of each linear a LoRA update may target, from (dim, ff_dim).
_LORA_SHAPES = {
    "attn.qkv": lambda c, f: (3 * c, c),
    "attn.proj": lambda c, f: (c, c),
    "mlp.fc1": lambda c, f: (f, c),
    "mlp.fc2": lambda c, f: (c, f),
}


def _pow2(n: int) -> int:
    return _common.next_pow2(max(int(n), 1))


def _linear(x, w, out, rows_per_program, *, ln=None, bias=None, gelu=False, res=None, qkv=None,
            embed=None, eps=0.0, lora=None):
    """One ``_row_linear_kernel`` launch over every row of ``x`` (``(rows, K)``, contiguous).

    Each program applies its weight tile to ``rows_per_program`` rows: fewer programs re-read
    the tile from L2, more run in parallel.

    ``qkv``: ``(k_cache, v_cache, pos, heads, head_dim)`` to write k and v into the layer's
    cache (``(rows, heads, T_MAX, head_dim)``) at ``pos`` and only q into ``out``.
    ``embed``: ``(ids, tok_emb, pos_emb)``: the input rows are the embeddings of ``ids`` at
    ``pos`` (with ``qkv``), written into ``x``.
    ``lora``: a :class:`LoraSlot` whose update is added to the linear's output.
    """
    rows, k = x.shape
    n = w.shape[0]
    block_k = _pow2(k)
    block_n = max(1, min(_pow2(n), _TILE // block_k))
    lnw, lnb = ln if ln is not None else (w, w)
    if qkv is not None:
        kc, vc, pos, heads, head_dim = qkv
        c, t_max = n // 3, kc.shape[2]
    else:
        kc = vc = pos = w
        c = heads = t_max = head_dim = 1
    ids, tok, pe = embed if embed is not None else (w, w, w)
    la, lb, ls, lrow, lrank = lora if lora is not None else (w, w, w, w, w)
    lora_n, lora_r = la.shape[:2] if lora is not None else (0, 0)
    _row_linear_kernel[(_common.cdiv(n, block_n), _common.cdiv(rows, rows_per_program))](
        x, lnw, lnb, w, bias if bias is not None else w, res if res is not None else w, out,
        kc, vc, pos, ids, tok, pe, la, lb, ls, lrow, lrank,
        rows, rows_per_program, n, k, eps, c, heads, t_max, head_dim, lora_n, lora_r,
        HAS_LN=ln is not None, HAS_BIAS=bias is not None, GELU=gelu, HAS_RES=res is not None,
        QKV=qkv is not None, EMBED=embed is not None, LORA=lora is not None,
        LORA_CHUNK=max(2, min(16, _TILE // 2 // block_k)), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4,
    )
    return out


def supports(embedding_dim: int, ff_dim: int, num_heads: int, device: torch.device) -> str | None:
    """``None`` if :func:`decode_step` serves this shape on ``device``, else why not."""
    reason = _common.available()
    if reason is not None:
        return reason
    if device.type not in _common.DEVICES:
        return f"the model is on {device}; the triton decode step needs CUDA"
    if max(embedding_dim, ff_dim) > MAX_FEATURES:
        return f"features above {MAX_FEATURES} (a weight tile would not fit in registers)"
    if embedding_dim % num_heads:
        return "embedding_dim is not a multiple of num_heads"
    return None


class LoraSlot(NamedTuple):
    """One wrapped linear's unmerged LoRA updates, as the step reads them (device data).

    ``a``: ``(adapters, max_rank, in_features)``; ``bt``: B transposed,
    ``(adapters, max_rank, out_features)``; ``scale``: ``(adapters,)``; ``rows``: ``(batch,)``
    int32, each row's adapter (-1 or out of range: no update); ``rank``: ``(1,)`` int32, the
    rank rows used (the rest may hold anything). See
    :class:`ryzen_opt.optimization.fastpaths.lora.DeviceLoraTables`.
    """

    a: torch.Tensor
    bt: torch.Tensor
    scale: torch.Tensor
    rows: torch.Tensor
    rank: torch.Tensor


def _check_lora(slot: LoraSlot, n: int, k: int, rows: int, where: str) -> None:
    if slot.a.dim() != 3 or slot.a.shape[2] != k:
        raise ValueError(
            f"lora[{where}].a must be (adapters, rank, {k}), got {tuple(slot.a.shape)}"
        )
    if slot.bt.shape != (*slot.a.shape[:2], n):
        raise ValueError(
            f"lora[{where}].bt must be {(*slot.a.shape[:2], n)}, got {tuple(slot.bt.shape)}"
        )
    if slot.rows.shape != (rows,) or slot.rows.dtype != torch.int32:
        raise ValueError(f"lora[{where}].rows must be ({rows},) int32")
    if slot.scale.shape != slot.a.shape[:1] or slot.rank.shape != (1,):
        raise ValueError(f"lora[{where}]: scale must be (adapters,) and rank (1,)")
    if not all(t.is_contiguous() for t in slot):
        raise ValueError(f"lora[{where}]: tables must be contiguous")


class Workspace:
    """The activations of one batch size's step, allocated once (a CUDA graph needs fixed
    addresses): residual stream, q, attention output, MLP hidden, logits."""

    def __init__(self, batch: int, c: int, ff: int, vocab: int, device, dtype) -> None:
        def buf(n):
            return torch.empty(batch, n, device=device, dtype=dtype)

        self.x, self.q, self.y, self.h, self.logits = buf(c), buf(c), buf(c), buf(ff), buf(vocab)


def decode_step(params: dict, ids, pos, k_cache, v_cache, ws: Workspace, *,
                heads: int, eps: float, rows_per_program: int = ROWS_PER_PROGRAM,
                lora: dict[tuple[int, str], LoraSlot] | None = None):
    """Logits ``(batch, vocab)`` of one token per row at position ``pos``; writes the KV cache.

    Args:
        params: the model's tensors by ``state_dict`` name (``tok_emb.weight``,
            ``blocks.<i>.ln1.weight``, ... ``head.weight``), contiguous, on one device.
        ids: ``(batch,)`` int64 token ids; pos: ``(1,)`` int64 position (device tensors).
        k_cache, v_cache: ``(layers, batch, heads, T_MAX, head_dim)``; position ``pos`` is
            written, ``0..pos`` attended.
        ws: the step's :class:`Workspace`; ``ws.logits`` holds the result.
        rows_per_program: batch rows each matmul program serves (see :func:`_linear`).
        lora: unmerged LoRA updates by ``(layer, linear)``, the linear one of ``"attn.qkv"``,
            ``"attn.proj"``, ``"mlp.fc1"``, ``"mlp.fc2"`` (missing: no update).
    """
    if rows_per_program < 1:
        raise ValueError(f"rows_per_program must be >= 1, got {rows_per_program}")
    rp = rows_per_program
    rows, c = ws.x.shape
    head_dim = c // heads
    t_max = k_cache.shape[3]
    lora = lora or {}
    for (i, name), slot in lora.items():
        if name not in _LORA_SHAPES or not 0 <= i < k_cache.shape[0]:
            raise ValueError(f"lora: unknown linear {(i, name)}")
        n, k = _LORA_SHAPES[name](c, ws.h.shape[1])
        _check_lora(slot, n, k, rows, f"{i}, {name!r}")
    for i in range(k_cache.shape[0]):
        def p(name, i=i):
            return params[f"blocks.{i}.{name}"]

        def lo(name, i=i):
            return lora.get((i, name))

        embed = (ids, params["tok_emb.weight"], params["pos_emb.weight"]) if i == 0 else None
        _linear(ws.x, p("attn.qkv.weight"), ws.q, rp, ln=(p("ln1.weight"), p("ln1.bias")),
                bias=p("attn.qkv.bias"), qkv=(k_cache[i], v_cache[i], pos, heads, head_dim),
                embed=embed, eps=eps, lora=lo("attn.qkv"))
        _attend_kernel[(rows * heads,)](
            ws.q, k_cache[i], v_cache[i], pos, ws.y,
            c, heads, t_max, head_dim, head_dim**-0.5,
            BLOCK_T=min(_ATTN_KEYS, _pow2(t_max)), BLOCK_D=_pow2(head_dim),
        )
        _linear(ws.y, p("attn.proj.weight"), ws.x, rp, bias=p("attn.proj.bias"), res=ws.x,
                lora=lo("attn.proj"))
        _linear(ws.x, p("mlp.fc1.weight"), ws.h, rp, ln=(p("ln2.weight"), p("ln2.bias")),
                bias=p("mlp.fc1.bias"), gelu=True, eps=eps, lora=lo("mlp.fc1"))
        _linear(ws.h, p("mlp.fc2.weight"), ws.x, rp, bias=p("mlp.fc2.bias"), res=ws.x,
                lora=lo("mlp.fc2"))
    return _linear(ws.x, params["head.weight"], ws.logits, rp,
                   ln=(params["ln_f.weight"], params["ln_f.bias"]), eps=eps)
