"""Triton mixed-batch LoRA (BGMV, as in Punica / S-LoRA): row ``r`` adds
``scales[i] * B[i] @ (A[i] @ x[r])`` with ``i = indices[r]``, nothing for -1.

Two kernels, both indexed by ``indices`` read on the device:

* ``_shrink_kernel``: grid (rows, splits). Each program dots one row of ``x`` with the
  ``rank`` rows of ``A[i]`` over one slice of ``in_features`` and stores an fp32 partial
  ``t`` (rank wide). Decode has few rows, so ``in_features`` is split to give the GPU enough
  programs; the partials are summed by the expand kernel (no atomics, deterministic).
* ``_expand_kernel``: grid (rows, out blocks). Sums the partials, scales, and multiplies one
  ``(BLOCK_N, rank)`` tile of ``B[i]``; with ``out`` it adds into the base layer's output.

A row of a decode batch is a matrix-vector product (``rank`` is 8..64), far below a tensor
core tile, so both kernels multiply with broadcasts and row sums in fp32 rather than
``tl.dot``. Rows with the same adapter read the same A/B tiles, which then come from L2.

CUDA graphs: the launch depends on shapes only. ``indices`` and ``scales`` are read by the
kernels, never on the host (no ``.item()``, no ``.tolist()``, no host-side grouping), so a
graph captured with ``indices`` as a device tensor replays correctly after the adapter mix
changes in place (``indices.copy_(new)``), without recapture.

Out-of-range indices: checking them would need a host sync, so the launcher checks CUDA
``indices`` for dtype and shape only. The kernels treat any index outside
``[0, n_adapters)`` like -1: the row gets no delta and A/B are never read out of bounds.
(CPU ``indices`` under ``TRITON_INTERPRET=1`` get the shared host-side range check and
raise ``ValueError``.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ryzen_opt.kernels import reference, registry
from ryzen_opt.kernels.triton import _common
from ryzen_opt.kernels.triton._launcher import CachedLauncher

# fmt: off
# Kernel signatures and launches keep their arguments grouped by role (pointers, sizes,
# strides, meta-parameters) on shared lines, as STYLE.md asks; the formatter would split them
# one per line.

# PEFT ranks are 4..256; one (rank x BLOCK_K) tile of A stays in registers up to 256.
_MAX_RANK = 256


def _tile_config(rows: int, in_features: int, out_features: int, rank: int, sms: int) -> dict:
    """Tile sizes and the split of ``in_features`` for one call (shapes only, never values).

    * A's tile (``BLOCK_R x BLOCK_K``) holds 4096 values at rank <= 16 and 2048 above.
      Registers from ptxas for sm_90a (bf16 inputs, 4 warps, no spills either way): 16 x
      256 uses 64, but 4096-value tiles at rank >= 32 jump to 161-209 (32 x 128, 64 x 64,
      128 x 32, 256 x 16), a third of the occupancy for a kernel that lives on loads in
      flight, while every 2048-value tile from 32 x 64 to 256 x 8 uses 80 (fp32 inputs:
      64 at 16 x 256, 80 at 64 x 32 and 256 x 8). Rank 16
      gets 256-wide K steps (512 bytes of bf16 A per tile row: whole 128-byte lines).
    * B's tile (``BLOCK_N x BLOCK_R``) holds at most 4096 values: 48-66 registers for every
      shape from 256 x 16 to 16 x 256.
    * Programs: decode has 1..64 rows, and one program per row would leave most of an
      H100/H200's 132 SMs idle while each streams ``rank * in_features`` of A. The K split
      aims at ~2 programs per SM; the expand narrows its tiles (down to 32 outputs) for the
      same reason. These follow from the arithmetic above; no GPU timing is behind them yet.
    """
    block_r = _common.next_pow2(max(rank, 1))
    budget = 4096 if block_r <= 16 else 2048
    block_k = max(8, min(512, budget // block_r, _common.next_pow2(max(in_features, 1))))
    k_blocks = _common.cdiv(max(in_features, 1), block_k)
    splits = max(1, min(k_blocks, _common.cdiv(2 * sms, max(rows, 1))))
    k_per_split = _common.cdiv(k_blocks, splits) * block_k
    splits = _common.cdiv(max(in_features, 1), k_per_split)
    block_n = max(16, min(4096 // block_r, _common.next_pow2(max(out_features, 1))))
    while block_n > 32 and rows * _common.cdiv(out_features, block_n) < 2 * sms:
        block_n //= 2
    return {
        "BLOCK_R": block_r, "BLOCK_K": block_k, "SPLITS": splits, "K_PER_SPLIT": k_per_split,
        "BLOCK_N": block_n, "BLOCK_S": _common.next_pow2(splits),
    }


@triton.jit
def _shrink_kernel(
    # pointers
    x_ptr, a_ptr, idx_ptr, part_ptr,
    # sizes
    N_ADAPTERS, RANK, IN_FEATURES, K_PER_SPLIT,
    # strides (part: (rows, SPLITS, BLOCK_R), contiguous)
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    ad = tl.load(idx_ptr + row).to(tl.int64)
    valid = (ad >= 0) & (ad < N_ADAPTERS)
    ad = tl.where(valid, ad, 0)
    k_lo = split * K_PER_SPLIT
    # A row without a (valid) adapter runs no iteration: no read of A, a zero partial.
    k_hi = tl.where(valid, min(k_lo + K_PER_SPLIT, IN_FEATURES), k_lo)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r[:, None] < RANK
    x_base = x_ptr + row.to(tl.int64) * stride_xm
    a_base = a_ptr + ad * stride_an + offs_r[:, None] * stride_ar
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_hi
        xv = tl.load(x_base + ks * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
        av = tl.load(a_base + ks[None, :] * stride_ak, mask=r_mask & k_mask[None, :], other=0.0)
        acc += tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
    part = part_ptr + (row.to(tl.int64) * tl.num_programs(1) + split) * BLOCK_R
    tl.store(part + offs_r, acc)


_launch_shrink = CachedLauncher(_shrink_kernel, loose="ints")


@triton.jit
def _expand_kernel(
    # pointers
    part_ptr, b_ptr, scale_ptr, idx_ptr, y_ptr,
    # sizes
    N_ADAPTERS, RANK, OUT_FEATURES, SPLITS,
    # strides
    stride_bn, stride_bo, stride_br, stride_ym, stride_yn,
    # meta-parameters
    ACCUMULATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    ad = tl.load(idx_ptr + row).to(tl.int64)
    valid = (ad >= 0) & (ad < N_ADAPTERS)
    ad = tl.where(valid, ad, 0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_s = tl.arange(0, BLOCK_S)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < OUT_FEATURES
    row64 = row.to(tl.int64)
    part = part_ptr + (row64 * SPLITS + offs_s[:, None]) * BLOCK_R + offs_r[None, :]
    t = tl.sum(tl.load(part, mask=offs_s[:, None] < SPLITS, other=0.0), axis=0)
    t = t * tl.load(scale_ptr + ad).to(tl.float32)
    # Masks carry the row's validity as a bound (a scalar bool in a mask trips the
    # interpreter): a row without a (valid) adapter has rank 0 and no outputs to update.
    rank_eff = tl.where(valid, RANK, 0)
    b_ptrs = b_ptr + ad * stride_bn + offs_n[:, None] * stride_bo + offs_r[None, :] * stride_br
    b_mask = n_mask[:, None] & (offs_r[None, :] < rank_eff)
    bv = tl.load(b_ptrs, mask=b_mask, other=0.0).to(tl.float32)
    y = tl.sum(bv * t[None, :], axis=1)
    y_ptrs = y_ptr + row64 * stride_ym + offs_n * stride_yn
    if ACCUMULATE:
        # Rows without an adapter leave the base output untouched (not even re-stored).
        upd = offs_n < tl.where(valid, OUT_FEATURES, 0)
        base = tl.load(y_ptrs, mask=upd, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (base + y).to(y_ptr.dtype.element_ty), mask=upd)
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=n_mask)


_launch_expand = CachedLauncher(_expand_kernel, loose="ints")


def supports(x, a, b, scales, indices, out=None) -> str | None:
    """``None`` if the Triton LoRA kernels can serve this call, else the reason."""
    tensors = (("x", x), ("a", a), ("b", b), ("scales", scales), ("indices", indices))
    for name, t in (*tensors, ("out", out)):
        if isinstance(t, torch.Tensor) and (reason := _common.device_reason(name, t)):
            return reason
    if isinstance(x, torch.Tensor) and x.dtype not in _common.KERNEL_DTYPES:
        return f"x is {x.dtype}; the triton lora_bgmv takes float16, bfloat16, float32"
    if isinstance(a, torch.Tensor) and a.dim() == 3 and a.shape[1] > _MAX_RANK:
        return f"a's rank is {a.shape[1]}; the triton lora_bgmv supports rank <= {_MAX_RANK}"
    return None


def _launch(x, a, b, scales, indices, out):
    """Allocate (unless ``out``), plan the tiles from shapes, launch shrink then expand."""
    rows, in_features = x.shape
    n_adapters, rank = a.shape[0], a.shape[1]
    out_features = b.shape[1]
    y = torch.empty((rows, out_features), device=x.device, dtype=x.dtype) if out is None else out
    if rows == 0 or out_features == 0:
        return y
    if rank == 0 or n_adapters == 0:
        return y.zero_() if out is None else y
    cfg = _tile_config(rows, in_features, out_features, rank, _common.num_sms(
        _common.device_index(x)))
    part = torch.empty((rows, cfg["SPLITS"], cfg["BLOCK_R"]), device=x.device,
                       dtype=torch.float32)
    _launch_shrink(
        (rows, cfg["SPLITS"]),
        x, a, indices, part,
        n_adapters, rank, in_features, cfg["K_PER_SPLIT"],
        *x.stride(), *a.stride(),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"], num_warps=4,
    )
    _launch_expand(
        (rows, _common.cdiv(out_features, cfg["BLOCK_N"])),
        part, b, scales, indices, y,
        n_adapters, rank, out_features, cfg["SPLITS"],
        *b.stride(), *y.stride(),
        ACCUMULATE=out is not None, BLOCK_R=cfg["BLOCK_R"], BLOCK_S=cfg["BLOCK_S"],
        BLOCK_N=cfg["BLOCK_N"], num_warps=4,
    )
    return y


@torch.library.custom_op("ryzen_opt::triton_lora_bgmv", mutates_args=())
def _lora_op(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    return _launch(x, a, b, scales, indices, None)


@_lora_op.register_fake
def _(x, a, b, scales, indices):
    return x.new_empty((x.shape[0], b.shape[1]))


@torch.library.custom_op("ryzen_opt::triton_lora_bgmv_add_", mutates_args=("out",))
def _lora_add_op(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
    indices: torch.Tensor, out: torch.Tensor,
) -> None:
    _launch(x, a, b, scales, indices, out)


@_lora_add_op.register_fake
def _(x, a, b, scales, indices, out):
    return None


def lora_bgmv(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mixed-batch LoRA delta on the GPU (see :func:`reference.lora_bgmv`).

    fp32 accumulation for every input dtype. Graph-safe: no host read of ``indices`` or
    ``scales`` (module docstring); an index outside ``[-1, n_adapters)`` on CUDA is not
    detected and its row gets no delta, as for -1.

    Args:
        x: ``(rows, in_features)``, float16/bfloat16/float32, any strides.
        a: ``(n_adapters, rank, in_features)``, ``rank <= 256``, ``x``'s dtype.
        b: ``(n_adapters, out_features, rank)``, ``x``'s dtype.
        scales: ``(n_adapters,)`` floating (read in fp32).
        indices: ``(rows,)`` int64/int32 on ``x``'s device; -1 = no adapter.
        out: optional ``(rows, out_features)`` of ``x``'s dtype, any strides: the delta is
            added into it in place (in fp32, rounded once) and ``out`` is returned.

    Returns:
        The ``(rows, out_features)`` delta in ``x.dtype``, or ``out``.

    Example:
        >>> y = lora_bgmv(x, a, b, scales, indices, out=base_out)  # doctest: +SKIP
    """
    reference.check_lora_args(x, a, b, scales, indices, out)
    for name, t in (("x", x), ("a", a), ("b", b), ("scales", scales), ("indices", indices),
                    ("out", out)):
        if t is not None:
            _common.check_device(name, t)
    reason = supports(x, a, b, scales, indices, out)
    if reason is not None:
        raise TypeError(reason) if "float" in reason else ValueError(reason)
    if not torch.compiler.is_compiling():  # eager: no custom-op dispatch (see matmul)
        return _launch(x, a, b, scales, indices, out)
    if out is None:
        return _lora_op(x, a, b, scales, indices)
    _lora_add_op(x, a, b, scales, indices, out)
    return out


registry.register(
    "lora_bgmv", "triton", _common.DEVICES, lora_bgmv, supports=supports,
    available=_common.available,
)
