"""The greedy decode loop's per-token bookkeeping in one Triton launch.

After a decode step has written its logits, a greedy loop captured in a CUDA graph picks
each row's next token and records it: mask the eos ids out of the argmax while fewer than
``block`` steps ran (``min_new_tokens``), take the argmax, give rows that already finished
the pad id, store the token in column ``j`` of the token buffer, mark rows that produced an
eos id finished, feed the token back as the next input. In PyTorch that is about ten small
kernels a token (each a launch and a pass over memory between two steps of the model);
:func:`greedy_tail` does it in one, one program per row. The position counters (``t``, ``j``,
the step number) are left to the caller: they are shared by every row, so no row's program
may advance them while another still reads them.

The argmax follows ``torch.argmax``: the first maximum, and a NaN counts as the maximum (the
first NaN wins). :func:`ryzen_opt.kernels.reference.greedy_tail` is the same bookkeeping in
PyTorch (the contract, the test oracle, and what a loop without Triton runs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ryzen_opt.kernels.triton import _common

# fmt: off
# Kernel signatures and launches keep their arguments grouped by role (pointers, sizes,
# strides, meta-parameters) on shared lines, as STYLE.md asks.

MAX_EOS = 64  # eos ids a tail checks (padded with -1)


@triton.jit
def _greedy_tail_kernel(
    # pointers
    logits_ptr, eos_mask_ptr, step_ptr, block_ptr, finished_ptr, pad_ptr, eos_ptr,
    tokens_ptr, j_ptr, ids_ptr,
    # sizes
    V, N_EOS,
    # strides
    stride_l, stride_tok,
    # meta-parameters
    BLOCK_V: tl.constexpr, BLOCK_EOS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    masking = tl.load(step_ptr) < tl.load(block_ptr)
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), -1, tl.int64)
    nan_i = tl.full((), -1, tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        inside = cols < V
        x = tl.load(logits_ptr + row * stride_l + cols, mask=inside, other=float("-inf"))
        x = x.to(tl.float32)
        if masking:
            blocked = tl.load(eos_mask_ptr + cols, mask=inside, other=0) != 0
            x = tl.where(blocked, float("-inf"), x)
        is_nan = x != x
        first_nan = tl.min(tl.where(is_nan & inside, cols, V), 0).to(tl.int64)
        nan_i = tl.where((nan_i < 0) & (first_nan < V), first_nan, nan_i)
        x = tl.where(is_nan, float("-inf"), x)
        m = tl.max(x, 0)
        # first column holding the block's maximum (inside the row)
        m_i = tl.min(tl.where((x == m) & inside, cols, V), 0).to(tl.int64)
        better = (m > best) | (best_i < 0)
        best = tl.where(better, m, best)
        best_i = tl.where(better, m_i, best_i)
    tok = tl.where(nan_i >= 0, nan_i, best_i)
    done = tl.load(finished_ptr + row) != 0
    tok = tl.where(done, tl.load(pad_ptr), tok)
    tl.store(tokens_ptr + row * stride_tok + tl.load(j_ptr), tok)
    e = tl.arange(0, BLOCK_EOS)
    eos = tl.load(eos_ptr + e, mask=e < N_EOS, other=-1)
    hit = tl.sum(((eos == tok) & (eos >= 0)).to(tl.int32), 0) > 0
    tl.store(finished_ptr + row, (done | hit).to(finished_ptr.dtype.element_ty))
    tl.store(ids_ptr + row, tok)


def _check(logits, eos_mask, step_no, block, finished, pad, eos, tokens, j, ids) -> None:
    named = {
        "logits": logits, "eos_mask": eos_mask, "step_no": step_no, "block": block,
        "finished": finished, "pad": pad, "eos": eos, "tokens": tokens, "j": j, "ids": ids,
    }
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        _common.check_device(name, t)
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, logits on {logits.device}")
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be (batch, vocab) with unit last stride, got "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if logits.dtype not in _common.KERNEL_DTYPES:
        raise TypeError(f"logits is {logits.dtype}; float16, bfloat16 or float32 expected")
    b, v = logits.shape
    expect = {
        "eos_mask": ((v,), torch.bool), "finished": ((b,), torch.bool),
        "ids": ((b,), torch.int64), "eos": (None, torch.int64), "step_no": ((1,), torch.int64),
        "block": ((1,), torch.int64), "pad": ((1,), torch.int64), "j": ((1,), torch.int64),
    }
    for name, (shape, dtype) in expect.items():
        t = named[name]
        if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
            raise ValueError(f"{name} must be {dtype} of shape {shape or '(n,)'}, got "
                             f"{t.dtype} {tuple(t.shape)}")
    if eos.dim() != 1 or eos.numel() > MAX_EOS:
        raise ValueError(f"eos must be 1-D with at most {MAX_EOS} ids, got {tuple(eos.shape)}")
    if tokens.dim() != 2 or tokens.shape[0] != b or tokens.dtype != torch.int64:
        raise ValueError(f"tokens must be int64 (batch={b}, columns), got {tokens.dtype} "
                         f"{tuple(tokens.shape)}")
    if not (ids.is_contiguous() and finished.is_contiguous() and eos_mask.is_contiguous()):
        raise ValueError("ids, finished and eos_mask must be contiguous")


def greedy_tail(logits, eos_mask, step_no, block, finished, pad, eos, tokens, j, ids) -> None:
    """Pick, record and feed back each row's greedy token, in place, in one launch.

    Args:
        logits: ``(batch, vocab)`` float16/bfloat16/float32, unit last stride (read only).
        eos_mask: ``(vocab,)`` bool, True at the eos ids.
        step_no, block: ``(1,)`` int64: eos ids are masked out of the argmax while
            ``step_no < block``.
        finished: ``(batch,)`` bool, updated: a row that emits an eos id becomes finished.
        pad: ``(1,)`` int64, the token a finished row emits.
        eos: ``(n,)`` int64 eos ids, ``n <= MAX_EOS``, ``-1`` entries ignored.
        tokens: ``(batch, columns)`` int64; column ``j`` receives the tokens.
        j: ``(1,)`` int64, the column (``0 <= j < columns``, not checked: device memory).
        ids: ``(batch,)`` int64, overwritten with the tokens (the next step's input).

    Every argument stays on the device and nothing is read back, so a CUDA graph can
    capture the call. Raises ``TypeError``/``ValueError`` naming the argument.
    """
    _check(logits, eos_mask, step_no, block, finished, pad, eos, tokens, j, ids)
    b, v = logits.shape
    if b == 0:
        return
    block_v = min(4096 if not _common.INTERPRET else 64, triton.next_power_of_2(max(v, 1)))
    _greedy_tail_kernel[(b,)](
        logits, eos_mask, step_no, block, finished, pad, eos,
        tokens, j, ids,
        v, eos.numel(),
        logits.stride(0), tokens.stride(0),
        BLOCK_V=block_v, BLOCK_EOS=max(2, triton.next_power_of_2(max(eos.numel(), 1))),
        num_warps=8 if block_v >= 2048 else 4,
    )
