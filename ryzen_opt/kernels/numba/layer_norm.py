"""Numba CPU LayerNorm over the last dim, fused with the pre-LN residual add.

One pass writes ``h = x + residual`` and sums it; a second pass over the (L1-resident, a
4096-wide row is 16 KiB) row takes the centred sum of squares, so the variance does not
suffer the E[x^2] - E[x]^2 cancellation; a third writes the output. Three passes over one
row in L1 against two full reads + two writes of memory for the unfused torch pair
(add, then layer_norm). Parallel over rows.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ryzen_opt.kernels import reference, registry
from ryzen_opt.kernels.numba._common import JIT, as_array, available, set_threads


@njit(**JIT)
def _layer_norm_row(x, res, has_res, h, w, has_w, bias, has_b, out, eps, i):
    """Row i of x, res, h, out: (rows, n) contiguous; h is written only when has_res."""
    n = x.shape[1]
    src = x[i]
    if has_res:
        hr = h[i]
        rr = res[i]
        for j in range(n):
            hr[j] = src[j] + rr[j]
        src = hr
    # Mean and variance accumulate in float64 and each value is centred in float64: with a
    # large common offset (|mean| >> std) an fp32 sum and an fp32 mean shift every centred
    # value by a few ulps of the offset, ~1e-5 relative at offset 64 over 600 values.
    total = 0.0
    for j in range(n):
        total += np.float64(src[j])
    mean = total / n
    sq = 0.0
    for j in range(n):
        dv = np.float64(src[j]) - mean
        sq += dv * dv
    rstd = np.float32(1.0 / np.sqrt(sq / n + eps))
    o = out[i]
    if has_w and has_b:
        for j in range(n):
            o[j] = np.float32(np.float64(src[j]) - mean) * rstd * w[j] + bias[j]
    elif has_w:
        for j in range(n):
            o[j] = np.float32(np.float64(src[j]) - mean) * rstd * w[j]
    elif has_b:
        for j in range(n):
            o[j] = np.float32(np.float64(src[j]) - mean) * rstd + bias[j]
    else:
        for j in range(n):
            o[j] = np.float32(np.float64(src[j]) - mean) * rstd


@njit(parallel=True, **JIT)
def _layer_norm_parallel(x, res, has_res, h, w, has_w, bias, has_b, out, eps):
    for i in prange(x.shape[0]):
        _layer_norm_row(x, res, has_res, h, w, has_w, bias, has_b, out, eps, i)


@njit(**JIT)
def _layer_norm_serial(x, res, has_res, h, w, has_w, bias, has_b, out, eps):
    for i in range(x.shape[0]):
        _layer_norm_row(x, res, has_res, h, w, has_w, bias, has_b, out, eps, i)


def supports(x, weight, bias, eps=1e-5, residual=None):
    """``None`` if the numba layer_norm serves this call, else why not."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if isinstance(t, torch.Tensor):
            if t.device.type != "cpu":
                return f"{name} is on {t.device}, numba kernels run on cpu"
            if t.dtype != torch.float32:
                return f"{name} is {t.dtype}, the numba kernels are float32 only"
    return None


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim in float32, optionally fused with a residual add.

    Args:
        x: ``(..., N)`` float32.
        weight, bias: optional ``(N,)``.
        eps: added to the variance.
        residual: optional, ``x``'s shape.

    Returns:
        ``layer_norm(x)``, or ``(layer_norm(h), h)`` with ``h = x + residual``.

    Example:
        >>> y, h = layer_norm(torch.randn(3, 8), torch.ones(8), None, residual=torch.randn(3, 8))
    """
    reference.check_layer_norm_args(x, weight, bias, residual, eps)
    reason = supports(x, weight, bias, eps, residual)
    if reason is not None:
        raise registry.BackendError(f"numba layer_norm cannot serve this call: {reason}")
    threads = set_threads()
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.float32)
    h = torch.empty(x.shape, dtype=torch.float32) if residual is not None else out
    if x.numel():
        x2 = x.reshape(-1, n).contiguous()
        r2 = residual.reshape(-1, n).contiguous() if residual is not None else x2
        dummy = torch.zeros(1)
        w = weight.contiguous() if weight is not None else dummy
        b = bias.contiguous() if bias is not None else dummy
        # Serial below 2**16 elements (~20 us): the OpenMP wake-up would dominate.
        small = x.numel() < (1 << 16)
        run = _layer_norm_serial if threads == 1 or small else _layer_norm_parallel
        run(
            as_array(x2),
            as_array(r2),
            residual is not None,
            as_array(h.view(-1, n)),
            as_array(w),
            weight is not None,
            as_array(b),
            bias is not None,
            as_array(out.view(-1, n)),
            np.float32(eps),
        )
    return out if residual is None else (out, h)


registry.register(
    "layer_norm", "numba", ("cpu",), layer_norm, supports=supports, available=available
)
