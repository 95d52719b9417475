"""The greedy decode loop's per-token bookkeeping in one Triton launch.

After a decode step has written its logits, a greedy loop captured in a CUDA graph picks
each row's next token and records it: mask the eos ids out of the argmax while fewer than
``block`` steps ran (``min_new_tokens``), take the argmax, give rows that already finished
the pad id, store the token in column ``j`` of the token buffer, mark rows that produced an
eos id finished, feed the token back as the next input. In PyTorch that is about ten small
kernels a token (each a launch and a pass over memory between two steps of the model);
:func:`greedy_tail` does it in one, a program per block of a row's vocabulary (the blocks
merge through an atomic max; the row's last block does the rest). The position counters
(``t``, ``j``, the step number) are left to the caller: they are shared by every row, so no
program may advance them while another still reads them.

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


# Each row's argmax is one int64 key per column, ordered as torch.argmax ranks columns: the
# high 32 bits hold the logit's float32 bits made order-preserving as signed int32 (a NaN the
# largest), the low 32 bits ``2**32 - 1 - column`` (the first column wins a tie). The
# largest key of a row is its argmax, so the row's vocabulary splits into blocks, one
# program each, that merge their keys with one atomic max.
KEY_EMPTY = -(2**63)  # below every column's key: a row's key before any block merged


@triton.jit
def _greedy_tail_kernel(
    # pointers
    logits_ptr, eos_mask_ptr, step_ptr, block_ptr, finished_ptr, pad_ptr, eos_ptr,
    tokens_ptr, j_ptr, ids_ptr, key_ptr, count_ptr,
    # sizes
    V, N_EOS,
    # strides
    stride_l, stride_tok,
    # meta-parameters
    BLOCK_V: tl.constexpr, BLOCK_EOS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n_blocks = tl.num_programs(1)
    low = tl.full((), 0xFFFFFFFF, tl.int64)  # int64 constants (a bare literal is uint32)
    empty = tl.full((), -9223372036854775808, tl.int64)  # KEY_EMPTY
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = cols < V
    x = tl.load(logits_ptr + row * stride_l + cols, mask=inside, other=float("-inf"))
    x = x.to(tl.float32)
    if tl.load(step_ptr) < tl.load(block_ptr):
        blocked = tl.load(eos_mask_ptr + cols, mask=inside, other=0) != 0
        x = tl.where(blocked, float("-inf"), x)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with 0.0 in torch.argmax: one key for both
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their order
    bits = tl.where(x != x, 0x7FFFFFFF, bits)  # any NaN above +inf
    key = (bits.to(tl.int64) << 32) | (low - cols.to(tl.int64))
    key = tl.where(inside, key, empty)
    tl.atomic_max(key_ptr + row, tl.max(key, 0))
    # The last of the row's programs to arrive (every atomic is acq_rel: it sees every
    # merged key) takes the result, resets the row's key and count for the next call, and
    # does the row's bookkeeping.
    if tl.atomic_add(count_ptr + row, 1) == n_blocks - 1:
        best = tl.atomic_xchg(key_ptr + row, empty)
        tl.atomic_xchg(count_ptr + row, 0)
        tok = low - (best & low)
        done = tl.load(finished_ptr + row) != 0
        tok = tl.where(done, tl.load(pad_ptr), tok)
        tl.store(tokens_ptr + row * stride_tok + tl.load(j_ptr), tok)
        e = tl.arange(0, BLOCK_EOS)
        eos = tl.load(eos_ptr + e, mask=e < N_EOS, other=-1)
        hit = tl.sum(((eos == tok) & (eos >= 0)).to(tl.int32), 0) > 0
        tl.store(finished_ptr + row, (done | hit).to(finished_ptr.dtype.element_ty))
        tl.store(ids_ptr + row, tok)


def tail_scratch(batch: int, device) -> torch.Tensor:
    """The per-row state :func:`greedy_tail`'s blocks merge through: ``(2, batch)`` int64,
    row 0 the keys (``KEY_EMPTY``), row 1 the arrival counts (0). Every call leaves it as it
    found it, so a CUDA graph can keep one for every replay."""
    out = torch.zeros(2, batch, dtype=torch.int64, device=device)
    out[0].fill_(KEY_EMPTY)
    return out


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


def greedy_tail(
    logits, eos_mask, step_no, block, finished, pad, eos, tokens, j, ids, scratch=None
) -> None:
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
        scratch: :func:`tail_scratch` ``(batch)``, left as it was found; ``None`` makes one
            for this call (a captured loop passes its own: no allocation in the graph).

    Every argument stays on the device and nothing is read back, so a CUDA graph can
    capture the call. Raises ``TypeError``/``ValueError`` naming the argument.
    """
    _check(logits, eos_mask, step_no, block, finished, pad, eos, tokens, j, ids)
    b, v = logits.shape
    if scratch is None:
        scratch = tail_scratch(b, logits.device)
    elif not (
        isinstance(scratch, torch.Tensor)
        and scratch.dtype == torch.int64
        and tuple(scratch.shape) == (2, b)
        and scratch.is_contiguous()
        and scratch.device == logits.device
    ):
        raise ValueError(
            f"scratch must be tail_scratch({b}, {logits.device}): contiguous int64 (2, {b}), "
            f"got {getattr(scratch, 'dtype', type(scratch).__name__)} "
            f"{tuple(getattr(scratch, 'shape', ()))}"
        )
    if b == 0:
        return
    block_v = min(1024 if not _common.INTERPRET else 64, _common.next_pow2(max(v, 1)))
    _greedy_tail_kernel[(b, _common.cdiv(v, block_v))](
        logits, eos_mask, step_no, block, finished, pad, eos,
        tokens, j, ids, scratch[0], scratch[1],
        v, eos.numel(),
        logits.stride(0), tokens.stride(0),
        BLOCK_V=block_v, BLOCK_EOS=max(2, _common.next_pow2(max(eos.numel(), 1))),
        num_warps=4,
    )
