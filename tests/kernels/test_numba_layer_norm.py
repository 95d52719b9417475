"""Numba CPU layer_norm (with the fused residual add) against the float64 reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from ryzen_opt.kernels import BackendError, reference  # noqa: E402
from ryzen_opt.kernels import layer_norm as public_layer_norm  # noqa: E402
from ryzen_opt.kernels.numba import layer_norm as nl  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402

# Two-pass fp32 mean/variance: measured <= 7e-8 here, inside the exact-order bound.
TOL_LN = TOL["fp32_exact"]


@pytest.fixture(autouse=True)
def _poison():
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _d(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("shape", [(2,), (3, 7), (2, 5, 1031), (3, 40, 1031)])
def test_layer_norm_matches_reference(shape, affine):
    x = torch.randn(shape) * 3 + 1
    w = torch.randn(shape[-1]) if affine[0] else None
    b = torch.randn(shape[-1]) if affine[1] else None
    ref = reference.layer_norm(_d(x), _d(w), _d(b), 1e-5)
    assert_close_rel(nl.layer_norm(x, w, b, 1e-5), ref, TOL_LN, f"{shape} {affine}")


def test_layer_norm_fused_residual_returns_output_and_sum():
    x, r = torch.randn(4, 9, 64) + 5, torch.randn(4, 9, 64)
    w, b = torch.randn(64), torch.randn(64)
    out, h = nl.layer_norm(x, w, b, 1e-6, residual=r)
    ref_out, ref_h = reference.layer_norm(_d(x), _d(w), _d(b), 1e-6, _d(r))
    assert_close_rel(out, ref_out, TOL_LN, "out")
    assert torch.equal(h, x + r)
    assert_close_rel(h, ref_h, TOL_LN, "h")


def test_layer_norm_single_element_rows_non_contiguous_and_empty():
    x = torch.randn(5, 1)
    ref = reference.layer_norm(_d(x), None, torch.ones(1, dtype=torch.float64), 1e-5)
    assert torch.equal(nl.layer_norm(x, None, torch.ones(1)), ref.float())
    x = torch.randn(8, 40)[::2, ::3]
    assert_close_rel(
        nl.layer_norm(x, None, None), reference.layer_norm(_d(x), None, None), TOL_LN, "strided"
    )
    assert nl.layer_norm(torch.randn(0, 8), None, None).shape == (0, 8)
    out, h = nl.layer_norm(torch.randn(0, 8), None, None, residual=torch.randn(0, 8))
    assert out.shape == h.shape == (0, 8)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    n=st.integers(1, 600),
    res=st.booleans(),
    offset=st.floats(-100, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_layer_norm_property_matches_reference(rows, n, res, offset, seed):
    torch.manual_seed(seed)
    x = torch.randn(rows, n) + offset
    r = torch.randn(rows, n) if res else None
    w, b = torch.randn(n), torch.randn(n)
    out = nl.layer_norm(x, w, b, 1e-5, r)
    ref = reference.layer_norm(_d(x), _d(w), _d(b), 1e-5, _d(r))
    if res:
        out, ref = out[0], ref[0]
    assert_close_rel(out, ref, TOL_LN, f"{rows}x{n} offset {offset}")


def test_layer_norm_bad_input_raises_naming_argument():
    with pytest.raises(ValueError, match="weight"):
        nl.layer_norm(torch.randn(3, 4), torch.randn(5), None)
    with pytest.raises(ValueError, match="residual"):
        nl.layer_norm(torch.randn(3, 4), None, None, residual=torch.randn(4, 3))


def test_layer_norm_unsupported_dtype_raises_backend_error():
    with pytest.raises(BackendError, match="float32"):
        public_layer_norm(torch.randn(3, 4).double(), None, None, backend="numba")
