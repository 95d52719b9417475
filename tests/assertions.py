"""Assertion helpers: relative error against a float64 reference, with the first mismatch."""

from __future__ import annotations

import torch

from ryzen_opt.kernels.reference import TOLERANCE, error_floor, relative_error

# DESIGN.md tolerances on ||out - ref|| / ||ref||: the library's per-dtype table, plus
# exact-order fp32 kernels and TF32 matrix units.
TOL = {**TOLERANCE, "fp32_exact": 1e-5, "tf32": 1e-3}


def rel_error(
    out: torch.Tensor,
    ref: torch.Tensor,
    tol: float,
    reduction: int = 1,
    magnitude: float = 1.0,
) -> float:
    """``||out - ref|| / max(||ref||, floor)`` with the library's floor for a result of
    ``out``'s dtype (see ``reference.error_floor``; test data are unit normals, so a term of a
    length-``reduction`` sum is of size ``magnitude`` = 1 unless the test scales it)."""
    dtype = out.dtype if out.is_floating_point() else torch.float32
    floor = error_floor(dtype, tol, out.numel(), reduction, magnitude)
    return relative_error(out, ref, floor)


def assert_close_rel(
    out: torch.Tensor,
    ref: torch.Tensor,
    tol: float,
    what: str = "",
    *,
    reduction: int = 1,
    magnitude: float = 1.0,
) -> None:
    """Fail with the relative error and the first mismatching element if out != ref.

    ``reduction`` and ``magnitude`` describe the computation (sum length, size of one term)
    for the error floor on results that cancel to near zero; they never loosen ``tol`` on an
    ordinary result (``reference.error_floor``).
    """
    assert out.shape == ref.shape, f"{what} shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what} output has NaN"
    err = rel_error(out, ref, tol, reduction, magnitude)
    if err <= tol:
        return
    diff = (out.detach().double().cpu() - ref.detach().double().cpu()).abs()
    idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
    raise AssertionError(
        f"{what} relative error {err:.3g} > {tol:g}; worst at {idx}: "
        f"out={out[idx].item():.6g} ref={ref[idx].item():.6g}"
    )
