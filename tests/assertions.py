"""Assertion helpers: relative error against a float64 reference, with the first mismatch."""

from __future__ import annotations

import torch

from ryzen_opt.kernels.reference import TOLERANCE

# DESIGN.md tolerances on ||out - ref|| / ||ref||: the library's per-dtype table, plus
# exact-order fp32 kernels and TF32 matrix units.
TOL = {**TOLERANCE, "fp32_exact": 1e-5, "tf32": 1e-3}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref64.norm()
    num = (out64 - ref64).norm()
    if denom == 0:
        return float(num)
    return float(num / denom)


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    """Fail with the relative error and the first mismatching element if out != ref."""
    assert out.shape == ref.shape, f"{what} shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what} output has NaN"
    err = rel_error(out, ref)
    if err <= tol:
        return
    diff = (out.detach().double().cpu() - ref.detach().double().cpu()).abs()
    idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
    raise AssertionError(
        f"{what} relative error {err:.3g} > {tol:g}; worst at {idx}: "
        f"out={out[idx].item():.6g} ref={ref[idx].item():.6g}"
    )
