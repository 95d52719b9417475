"""Triton RMSNorm/LayerNorm fused with the residual add, forward and backward, against the
float64 reference."""

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels import reference  # noqa: E402
from ryzen_opt.kernels.triton.training import (  # noqa: E402
    SUPPORTS,
    _norm,  # noqa: E402
    layer_norm_residual,
    rms_norm_residual,
)
from tests.kernels.train_check import DEVICE, check_fwd_bwd, leaf  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# A single element, primes, a row count that leaves the backward's last program short
# (2 programs per SM), a last dim past one 1024 tile, 3-D.
SHAPES = [(1, 1), (1, 17), (13, 113), (37, 7), (2, 1031), (2, 5, 64)]


@pytest.fixture(autouse=True)
def _poison():
    # torch.empty fills NaN in deterministic mode: unwritten outputs fail the comparison.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _rms(eps):
    return (
        lambda x, r, w: rms_norm_residual(x, r, w, eps),
        lambda x, r, w: reference.rms_norm_residual(x, r, w, eps),
    )


def _ln(eps):
    return (
        lambda x, r, w, b: layer_norm_residual(x, r, w, b, eps),
        lambda x, r, w, b: reference.layer_norm_residual(x, r, w, b, eps),
    )


def _reductions(shape):
    # The weight and bias gradients sum over every row: their error floor (for columns that
    # cancel) counts that many terms.
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return {"grad2": rows, "grad3": rows}


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_residual_matches_reference(shape, dtype, residual):
    n = shape[-1]
    x, r = leaf(*shape, dtype=dtype, scale=2.0), leaf(*shape, dtype=dtype)
    w = leaf(n, dtype=dtype)
    op, ref = _rms(1e-6)
    build = (lambda ts: ts) if residual else (lambda ts: (ts[0], None, ts[2]))
    leaves = [x, r if residual else r.detach(), w]
    check_fwd_bwd(op, ref, leaves, build, dtype, f"{shape}", _reductions(shape))


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_residual_matches_reference(shape, dtype, residual):
    n = shape[-1]
    x, r = leaf(*shape, dtype=dtype, scale=2.0), leaf(*shape, dtype=dtype)
    w, b = leaf(n, dtype=dtype), leaf(n, dtype=dtype)
    op, ref = _ln(1e-5)
    build = (lambda ts: ts) if residual else (lambda ts: (ts[0], None, ts[2], ts[3]))
    leaves = [x, r if residual else r.detach(), w, b]
    check_fwd_bwd(op, ref, leaves, build, dtype, f"{shape}", _reductions(shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_without_affine_and_with_frozen_weight(dtype):
    x, r = leaf(9, 33, dtype=dtype), leaf(9, 33, dtype=dtype)
    op, ref = _ln(1e-5)
    check_fwd_bwd(op, ref, [x, r], lambda ts: (*ts, None, None), dtype, "ln no affine")
    op, ref = _rms(1e-6)
    check_fwd_bwd(op, ref, [x, r], lambda ts: (*ts, None), dtype, "rms no weight")
    w = leaf(33, dtype=dtype, grad=False)  # a frozen weight gets no gradient
    check_fwd_bwd(op, ref, [x, r, w], lambda ts: ts, dtype, "rms frozen weight")
    assert w.grad is None


def test_float32_weight_with_bfloat16_activations():
    x, r = leaf(5, 48, dtype=torch.bfloat16), leaf(5, 48, dtype=torch.bfloat16)
    w = leaf(48, dtype=torch.float32)
    y, h = rms_norm_residual(x, r, w, 1e-6)
    assert y.dtype == torch.bfloat16
    (y.float().sum() + h.float().sum()).backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_non_contiguous_inputs():
    dtype = torch.float32
    base = leaf(11, 70, dtype=dtype)  # rows of stride 70, 57 wide
    xt = leaf(57, 11, dtype=dtype)  # transposed: no unit stride, copied to rows
    w, b = leaf(57, dtype=dtype), leaf(57, dtype=dtype)
    op, ref = _ln(1e-5)
    check_fwd_bwd(
        op, ref, [base, xt, w, b], lambda ts: (ts[0][:, 3:60], ts[1].t(), *ts[2:]), dtype, "strided"
    )
    op, ref = _rms(1e-6)
    check_fwd_bwd(
        op, ref, [base, xt, w], lambda ts: (ts[1].t(), ts[0][:, 3:60], ts[2]), dtype, "strided rms"
    )


def test_residual_stream_gradient_reaches_both_inputs():
    # h feeds the next block and the loss: d/dx = d/dresidual = norm backward + dL/dh.
    x, r = leaf(4, 40, dtype=torch.float32), leaf(4, 40, dtype=torch.float32)
    w = leaf(40, dtype=torch.float32)
    y, h = rms_norm_residual(x, r, w, 1e-6)
    (y.sum() * 0 + (h * 3).sum()).backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    torch.testing.assert_close(r.grad, torch.full_like(r, 3.0))


def test_only_one_output_used():
    x, r = leaf(3, 20, dtype=torch.float32), leaf(3, 20, dtype=torch.float32)
    w, b = leaf(20, dtype=torch.float32), leaf(20, dtype=torch.float32)
    y, _ = layer_norm_residual(x, r, w, b, 1e-5)
    y.sum().backward()
    xd, rd, wd, bd = [t.detach().double().requires_grad_() for t in (x, r, w, b)]
    reference.layer_norm_residual(xd, rd, wd, bd, 1e-5)[0].sum().backward()
    for t, d in ((x, xd), (r, rd), (w, wd), (b, bd)):
        torch.testing.assert_close(t.grad.double(), d.grad, atol=1e-5, rtol=1e-4)


def test_without_residual_h_is_x():
    x = leaf(3, 8, dtype=torch.float32)
    _, h = rms_norm_residual(x, None, None, 1e-6)
    assert h is x
    _, h = layer_norm_residual(x, None, None, None, 1e-5)
    assert h is x


def test_empty_rows():
    x = leaf(0, 16, dtype=torch.float32)
    w = leaf(16, dtype=torch.float32)
    y, h = rms_norm_residual(x, x, w, 1e-6)
    assert y.shape == h.shape == (0, 16)
    (y.sum() + h.sum()).backward()
    assert x.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros_like(w))


def test_bad_input_names_the_argument():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm_residual(x, None, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual must have"):
        layer_norm_residual(x, torch.randn(3, 9, device=DEVICE), None, None, 1e-5)
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        rms_norm_residual(x, x.half(), None, 1e-6)
    with pytest.raises(ValueError, match="eps must be"):
        rms_norm_residual(x, None, None, -1.0)
    with pytest.raises(TypeError, match="x is torch.float64"):
        layer_norm_residual(x.double(), None, None, None, 1e-5)
    with pytest.raises(TypeError, match="bias must have weight's dtype"):
        layer_norm_residual(
            x, None, torch.ones(8, device=DEVICE), torch.ones(8, device=DEVICE).half(), 1e-5
        )
    with pytest.raises(ValueError, match="x is on meta"):
        rms_norm_residual(torch.empty(3, 8, device="meta"), None, None, 1e-6)
    with pytest.raises(ValueError, match="rows <= 65536"):
        rms_norm_residual(torch.empty(1, _norm.MAX_N + 1, device=DEVICE), None, None, 1e-6)


def test_supports_gives_the_reason_or_none():
    x = torch.empty(3, 8, device="meta")
    assert SUPPORTS["rms_norm_residual"](x, x, None) is None
    assert SUPPORTS["layer_norm_residual"](x, None, None, None) is None
    assert "float64" in SUPPORTS["rms_norm_residual"](x.double(), None, None)
    wide = torch.empty(1, _norm.MAX_N + 1, device="meta")
    assert "rows <=" in SUPPORTS["layer_norm_residual"](wide, None, None, None)
