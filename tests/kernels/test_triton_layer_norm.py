"""Triton LayerNorm (with fused residual add) against the float64 reference."""

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels import reference  # noqa: E402
from ryzen_opt.kernels.triton import layer_norm as tln  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison():
    # torch.empty fills NaN in deterministic mode: unwritten outputs fail assert_close_rel.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _d(t):
    return None if t is None else t.detach().double().cpu()


@pytest.mark.parametrize("shape", [(1, 17), (3, 113), (2, 5, 255), (4, 1), (7, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_reference(shape, dtype, affine):
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 3 + 1
    n = shape[-1]
    w = torch.randn(n, device=DEVICE, dtype=dtype) if affine else None
    b = torch.randn(n, device=DEVICE, dtype=dtype) if affine else None
    out = tln.layer_norm(x, w, b)
    assert_close_rel(out, reference.layer_norm(_d(x), _d(w), _d(b)), TOL[dtype], str(shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_fused_residual_returns_norm_and_sum(dtype):
    x = torch.randn(6, 113, device=DEVICE, dtype=dtype)
    r = torch.randn(6, 113, device=DEVICE, dtype=dtype)
    w, b = torch.randn(113, device=DEVICE), torch.randn(113, device=DEVICE)
    out, h = tln.layer_norm(x, w, b, eps=1e-3, residual=r)
    ref_out, ref_h = reference.layer_norm(_d(x), _d(w), _d(b), 1e-3, _d(r))
    assert_close_rel(h, ref_h, TOL[dtype], "h")
    assert_close_rel(out, ref_out, TOL[dtype], "out")


def test_layer_norm_strided_inputs():
    wide = torch.randn(9, 300, device=DEVICE)
    x = wide[:, :255]  # row stride 300
    xt = torch.randn(255, 9, device=DEVICE).t()  # last dim strided: copied to rows
    r = torch.randn(9, 255, device=DEVICE)
    for inp in (x, xt):
        out, h = tln.layer_norm(inp, None, None, residual=r)
        ref_out, ref_h = reference.layer_norm(_d(inp), None, None, residual=_d(r))
        assert_close_rel(out, ref_out, TOL[torch.float32])
        assert_close_rel(h, ref_h, TOL[torch.float32])


def test_layer_norm_rejects_bad_input_naming_the_argument():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        tln.layer_norm(x, torch.ones(7, device=DEVICE), None)
    with pytest.raises(ValueError, match="residual must have"):
        tln.layer_norm(x, None, None, residual=torch.randn(3, 9, device=DEVICE))
    with pytest.raises(TypeError, match="residual is torch.float16"):
        tln.layer_norm(x, None, None, residual=x.half())
    with pytest.raises(ValueError, match="x is on meta"):
        tln.layer_norm(torch.empty(3, 8, device="meta"), None, None)


@pytest.mark.gpu
def test_layer_norm_gpu_sizes_match_reference():
    for n in (768, 4096, 8192):
        x = torch.randn(4096, n, device=DEVICE, dtype=torch.bfloat16)
        r = torch.randn_like(x)
        w, b = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
        out, h = tln.layer_norm(x, w, b, residual=r)
        ref_out, ref_h = reference.layer_norm(
            x.double(), w.double(), b.double(), residual=r.double()
        )
        assert_close_rel(out, ref_out, TOL[torch.bfloat16], f"N={n}")
        assert_close_rel(h, ref_h, TOL[torch.bfloat16], f"h N={n}")
