"""Triton SwiGLU and GELU training ops, forward and backward, against the float64 reference."""

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels import reference  # noqa: E402
from ryzen_opt.kernels.triton.training import gelu, swiglu  # noqa: E402
from ryzen_opt.kernels.triton.training import gelu_op as gelu_mod  # noqa: E402
from ryzen_opt.kernels.triton.training import swiglu_op as swiglu_mod  # noqa: E402
from tests.kernels.train_check import DEVICE, check_fwd_bwd, leaf  # noqa: E402

# The interpreter's numpy exp overflows to inf for sigmoid(-large): the limit 0 is correct.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 1 element, primes, a row longer than the 1024-element block, 3-D.
SHAPES = [(1,), (1, 1), (7, 13), (3, 1031), (2, 5, 113)]


@pytest.fixture(autouse=True)
def _poison():
    # torch.empty fills NaN in deterministic mode: unwritten outputs fail the comparison.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference_forward_and_backward(shape, dtype):
    g, u = leaf(*shape, dtype=dtype, scale=2.0), leaf(*shape, dtype=dtype)
    check_fwd_bwd(swiglu, reference.swiglu, [g, u], lambda ts: ts, dtype, f"{shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_reads_chunks_of_a_fused_projection_in_place(dtype):
    # gate, up = proj.chunk(2, -1): row stride 2 * 37, and a transposed (non unit-stride) view.
    proj = leaf(6, 74, dtype=dtype, scale=2.0)
    check_fwd_bwd(swiglu, reference.swiglu, [proj], lambda ts: ts[0].chunk(2, -1), dtype, "chunk")
    g, u = leaf(37, 5, dtype=dtype), leaf(5, 37, dtype=dtype)
    check_fwd_bwd(swiglu, reference.swiglu, [g, u], lambda ts: (ts[0].t(), ts[1]), dtype, "t")


def test_swiglu_gradient_for_one_input_only():
    g, u = leaf(4, 9, dtype=torch.float32), leaf(4, 9, dtype=torch.float32, grad=False)
    check_fwd_bwd(swiglu, reference.swiglu, [g, u], lambda ts: ts, torch.float32, "gate only")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_matches_reference_forward_and_backward(shape, dtype, approximate):
    x = leaf(*shape, dtype=dtype, scale=3.0)
    check_fwd_bwd(
        lambda t: gelu(t, approximate),
        lambda t: reference.gelu(t, approximate),
        [x],
        lambda ts: ts,
        dtype,
        f"{shape} {approximate}",
    )


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_non_contiguous_input(approximate):
    x = leaf(113, 6, dtype=torch.float32, scale=3.0)
    check_fwd_bwd(
        lambda t: gelu(t, approximate),
        lambda t: reference.gelu(t, approximate),
        [x],
        lambda ts: (ts[0].t()[:, 1:],),
        torch.float32,
        approximate,
    )


def test_empty_inputs_give_empty_outputs_and_gradients():
    g, u = leaf(0, 8, dtype=torch.float32), leaf(0, 8, dtype=torch.float32)
    y = swiglu(g, u)
    y.sum().backward()
    assert y.shape == (0, 8) and g.grad.shape == (0, 8) and u.grad.shape == (0, 8)
    assert gelu(torch.empty(3, 0, device=DEVICE)).shape == (3, 0)


def test_no_grad_call_saves_nothing_and_matches():
    x = leaf(5, 7, dtype=torch.float32)
    with torch.no_grad():
        y = gelu(x)
    assert not y.requires_grad
    torch.testing.assert_close(y, torch.nn.functional.gelu(x.detach()))


def test_bad_input_names_the_argument():
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="up must have gate's shape"):
        swiglu(x, torch.randn(3, 5, device=DEVICE))
    with pytest.raises(TypeError, match="up must have gate's dtype"):
        swiglu(x, x.half())
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        swiglu([1.0], x)
    with pytest.raises(TypeError, match="x is torch.float64"):
        gelu(x.double())
    with pytest.raises(ValueError, match="approximate must be one of"):
        gelu(x, "erf")
    with pytest.raises(ValueError, match="x is on meta"):
        gelu(torch.empty(3, device="meta"))


def test_supports_gives_the_reason_or_none():
    x = torch.empty(3, 4, device=DEVICE)
    assert swiglu_mod.supports(x, x) is None
    assert gelu_mod.supports(x, "tanh") is None
    assert "float64" in swiglu_mod.supports(x.double(), x.double())
    assert "approximate" in gelu_mod.supports(x, "fast")
    assert swiglu_mod.supports(torch.empty(3, device="meta"), torch.empty(3, device="meta")) is None
