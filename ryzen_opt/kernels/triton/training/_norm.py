"""Kernels shared by the RMSNorm and LayerNorm training ops (``RMS`` picks the statistics).

Forward: one program normalises ROWS rows held whole in registers, reading ``x`` (and
``residual``) once, writing ``y``, ``h = x + residual`` and the per-row ``rstd`` (and
``mean``) that backward reuses instead of recomputing.

Backward: a persistent grid of about two programs per SM walks its share of rows one at a
time, writing ``dh`` per row and keeping the weight and bias gradients as float32 row sums in
registers; each program stores its partial sums once and torch adds the few partial rows.
That replaces eager PyTorch's separate passes (residual add, norm backward, a column
reduction for ``dweight``, and the add of the residual stream's gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ryzen_opt.kernels.triton._launcher import CachedLauncher
from ryzen_opt.kernels.triton.training import _common

# fmt: off
# Kernel signatures and launches keep their arguments grouped by role (pointers, sizes,
# strides, meta-parameters) on shared lines, as STYLE.md asks.

# 64K fp32 values per row in registers spill beyond recovery (8 warps x 32 lanes x 256).
MAX_N = 65536


@triton.jit
def _norm_fwd_kernel(
    # pointers
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr,
    # sizes
    n_rows, N, eps,
    # strides (rows; the last dim is contiguous)
    stride_x, stride_r, stride_y, stride_h,
    # meta-parameters
    RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < N)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # h is rounded to x's dtype before the statistics, as the unfused x + residual is.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows64[:, None] * stride_h + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, 1) / N
        tl.store(mean_ptr + rows64, mean, mask=row_ok)
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, 1) / N + eps)
    tl.store(rstd_ptr + rows64, rstd, mask=row_ok)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)


_launch_norm_fwd = CachedLauncher(_norm_fwd_kernel, loose="ints")


@triton.jit
def _norm_bwd_kernel(
    # pointers
    dy_ptr, dhout_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, dh_ptr, dw_ptr, db_ptr,
    # sizes
    n_rows, N, ROWS_PER_PROGRAM,
    # strides (rows; the last dim is contiguous; dw/db partials are (programs, N))
    stride_dy, stride_dhout, stride_h, stride_dh, stride_dw,
    # meta-parameters
    RMS: tl.constexpr, HAS_DHOUT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = pid * ROWS_PER_PROGRAM
    end = tl.minimum(start + ROWS_PER_PROGRAM, n_rows)
    for row in range(start, end):
        r64 = tl.cast(row, tl.int64)
        h = tl.load(h_ptr + r64 * stride_h + cols, mask=cmask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64 * stride_dy + cols, mask=cmask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r64)
        xhat = h * rstd if RMS else tl.where(cmask, (h - tl.load(mean_ptr + r64)) * rstd, 0.0)
        g = dy * w if HAS_WEIGHT else dy
        # d/dh of (h - mean) * rstd applied to g: rstd * (g - mean(g) - xhat * mean(g * xhat));
        # RMSNorm has no mean term.
        c = tl.sum(g * xhat, 0) / N
        dh = rstd * (g - xhat * c) if RMS else rstd * (g - tl.sum(g, 0) / N - xhat * c)
        if HAS_DHOUT:
            dh += tl.load(dhout_ptr + r64 * stride_dhout + cols, mask=cmask,
                          other=0.0).to(tl.float32)
        tl.store(dh_ptr + r64 * stride_dh + cols, dh.to(dh_ptr.dtype.element_ty), mask=cmask)
        if WANT_DW:
            dw += dy * xhat
        if WANT_DB:
            db += dy
    if WANT_DW:
        tl.store(dw_ptr + pid * stride_dw + cols, dw, mask=cmask)
    if WANT_DB:
        tl.store(db_ptr + pid * stride_dw + cols, db, mask=cmask)


_launch_norm_bwd = CachedLauncher(_norm_bwd_kernel, loose="ints")


def forward(x, residual, weight, bias, eps, rms):
    """``(y, h, mean, rstd)``; ``h`` is empty without ``residual``, ``mean`` empty for RMS."""
    n = x.shape[-1]
    n_rows = x.numel() // n if n else 0
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    h = torch.empty(x.shape if residual is not None else (0,), device=x.device, dtype=x.dtype)
    f32 = {"device": x.device, "dtype": torch.float32}
    mean = torch.empty((0,) if rms else (n_rows,), **f32)
    rstd = torch.empty((n_rows,), **f32)
    if x.numel() == 0:
        return y, h, mean, rstd
    x2 = _common.rows(x, n)
    r2 = _common.rows(residual, n) if residual is not None else x2
    y2 = y.view(-1, n)
    h2 = h.view(-1, n) if residual is not None else y2
    block_n = _common.next_pow2(n)
    # ~4096 values per program, 8-16 per thread, as the inference layer_norm (measured there).
    rows = max(1, min(16, 4096 // block_n))
    warps = min(16, max(4, block_n * rows // 512))
    _launch_norm_fwd(
        (_common.cdiv(n_rows, rows),),
        x2, r2, weight if weight is not None else y2, bias if bias is not None else y2,
        y2, h2, mean if not rms else rstd, rstd,
        n_rows, n, float(eps),
        x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
        RMS=rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, ROWS=rows, BLOCK_N=block_n, num_warps=warps,
    )
    return y, h, mean, rstd


def backward(dy, dh_out, h, weight, mean, rstd, rms, want_dw, want_db):
    """``(dh, dweight, dbias)`` in ``h``'s, ``weight``'s and ``weight``'s dtype (the last
    two empty when not wanted); ``dh`` includes ``dh_out``, the gradient reaching ``h``."""
    n = h.shape[-1]
    n_rows = h.numel() // n if n else 0
    dh = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    wdt = weight.dtype if weight is not None else h.dtype
    if h.numel() == 0:
        def zeros(want):
            return torch.zeros((n,) if want else (0,), device=h.device, dtype=wdt)

        return dh, zeros(want_dw), zeros(want_db)
    h2, dy2 = _common.rows(h, n), _common.rows(dy, n)
    dho2 = _common.rows(dh_out, n) if dh_out is not None else h2
    dh2 = dh.view(-1, n)
    # Two programs per SM keep every SM busy while one waits on memory; each writes one
    # partial row of dweight/dbias, so the partials stay tiny (2 * SMs rows).
    programs = min(n_rows, 2 * _common.sms(h))
    per_program = _common.cdiv(n_rows, programs)
    programs = _common.cdiv(n_rows, per_program)
    f32 = {"device": h.device, "dtype": torch.float32}
    dw = torch.empty((programs, n) if want_dw else (0, n), **f32)
    db = torch.empty((programs, n) if want_db else (0, n), **f32)
    block_n = _common.next_pow2(n)
    warps = min(16, max(4, block_n // 256))
    _launch_norm_bwd(
        (programs,),
        dy2, dho2, h2, weight if weight is not None else h2, mean if not rms else rstd, rstd,
        dh2, dw if want_dw else dh2, db if want_db else dh2,
        n_rows, n, per_program,
        dy2.stride(0), dho2.stride(0), h2.stride(0), dh2.stride(0), n,
        RMS=rms, HAS_DHOUT=dh_out is not None, HAS_WEIGHT=weight is not None,
        WANT_DW=want_dw, WANT_DB=want_db, BLOCK_N=block_n, num_warps=warps,
    )
    return dh, dw.sum(0).to(wdt), db.sum(0).to(wdt)


def check(name_of_op, x, residual, weight, bias):
    """Device and dtype checks shared by both norms (the value checks are the reference's)."""
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        _common.check_device(name, t)
        _common.check_dtype(name, t)
    if x.shape[-1] > MAX_N:
        raise ValueError(
            f"x's last dim is {x.shape[-1]}; the triton {name_of_op} holds rows <= {MAX_N}"
        )
    if bias is not None and weight is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")


def supports(name_of_op, x, residual, weight, bias) -> str | None:
    r = _common.reason(name_of_op, x=x, residual=residual, weight=weight, bias=bias)
    if r is None and isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] > MAX_N:
        return f"x's last dim is {x.shape[-1]}; the triton {name_of_op} holds rows <= {MAX_N}"
    return r
