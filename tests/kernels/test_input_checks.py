"""Bad arguments raise naming the argument on every backend; activations at +-inf and NaN.

The checks live in ``reference.check_*_args``, which every launcher calls and the registry
runs before reporting that a backend cannot serve a call, so each backend raises the same
error for the same bad input.
"""

import math

import pytest
import torch

from ryzen_opt.kernels import attention, backends, decode_attention, layer_norm, matmul

INF, NAN = math.inf, math.nan


def _names(op):
    extra = [n for n in ("numba", "triton") if n in backends(op)]
    return ["reference", "auto", *[n for n in extra if backends(op)[n].available() is None]]


@pytest.fixture(autouse=True)
def _tf32():
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the triton matmul's fp32 contract
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


def _qkv():
    return torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)


@pytest.mark.parametrize("backend", _names("attention"))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_attention_integer_mask_is_refused_naming_attn_mask(backend, dtype):
    # SDPA refuses it too: a 0/1 integer mask added to the scores would mask nothing.
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        attention(q, k, v, attn_mask=torch.ones(3, 5, dtype=dtype), backend=backend)


@pytest.mark.parametrize("backend", _names("attention"))
@pytest.mark.parametrize(
    ("scale", "error"),
    [
        (NAN, ValueError),
        (INF, ValueError),
        (-INF, ValueError),
        ("x", TypeError),
        (True, TypeError),
        (torch.tensor(0.5), TypeError),
    ],
)
def test_attention_bad_scale_raises_naming_scale(backend, scale, error):
    q, k, v = _qkv()
    with pytest.raises(error, match="scale"):
        attention(q, k, v, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", _names("attention"))
def test_attention_zero_and_negative_scale_are_served(backend):
    # Finite scales are well defined (0: uniform weights), as in SDPA.
    q, k, v = _qkv()
    out = attention(q, k, v, scale=0.0, backend=backend)
    # 1e-3 is the TF32 bound for triton's dots on a GPU (TF32 is on in this file); CPU
    # backends average in fp32.
    atol = 1e-3 if backend == "triton" and torch.cuda.is_available() else 1e-5
    assert torch.allclose(out, v.mean(dim=2, keepdim=True).expand_as(out), atol=atol)
    assert torch.isfinite(attention(q, k, v, scale=-0.5, backend=backend)).all()


@pytest.mark.parametrize("backend", _names("decode_attention"))
@pytest.mark.parametrize(("scale", "error"), [(NAN, ValueError), ("x", TypeError)])
def test_decode_bad_scale_raises_naming_scale(backend, scale, error):
    q, k, v = torch.randn(1, 2, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(error, match="scale"):
        decode_attention(q, k, v, torch.tensor([3]), scale, backend=backend)


@pytest.mark.parametrize("backend", _names("layer_norm"))
@pytest.mark.parametrize(
    ("eps", "error"),
    [
        (-1.0, ValueError),
        (NAN, ValueError),
        (INF, ValueError),
        ("a", TypeError),
        (None, TypeError),
        (False, TypeError),
    ],
)
def test_layer_norm_bad_eps_raises_naming_eps(backend, eps, error):
    with pytest.raises(error, match="eps"):
        layer_norm(torch.randn(2, 4), None, None, eps, backend=backend)


@pytest.mark.parametrize("backend", _names("layer_norm"))
def test_layer_norm_zero_eps_is_exact_layer_norm(backend):
    x = torch.randn(3, 8)
    out = layer_norm(x, None, None, 0, backend=backend)
    expect = torch.nn.functional.layer_norm(x.double(), (8,), eps=0.0)
    assert torch.allclose(out.double(), expect, atol=1e-5)


@pytest.mark.parametrize("backend", _names("matmul"))
@pytest.mark.parametrize("out_dtype", ["float16", "torch.float16", torch.int32, 16])
def test_matmul_out_dtype_must_be_a_float_torch_dtype(backend, out_dtype):
    with pytest.raises(TypeError, match="out_dtype"):
        matmul(torch.randn(2, 3), torch.randn(3, 4), out_dtype=out_dtype, backend=backend)
    out = matmul(torch.randn(2, 3), torch.randn(3, 4), out_dtype=torch.float16, backend=backend)
    assert out.dtype == torch.float16


_SPECIAL = torch.tensor([-INF, -1e30, -100.0, -88.5, INF, 1e30, NAN])
# The limits: GELU and SiLU go to -0.0 as x -> -inf (torch's own fp32 gives NaN at -inf,
# -inf * 0, and gelu(+inf) = NaN, so the values are written out here); relu keeps NaN.
_LIMITS = {
    "gelu": [0.0, 0.0, 0.0, 0.0, INF, 1e30, NAN],
    "gelu_tanh": [0.0, 0.0, 0.0, 0.0, INF, 1e30, NAN],
    "silu": [0.0, 0.0, 0.0, 0.0, INF, 1e30, NAN],
    "relu": [0.0, 0.0, 0.0, 0.0, INF, 1e30, NAN],
}


@pytest.mark.parametrize("backend", [n for n in _names("matmul") if n not in ("reference", "auto")])
@pytest.mark.parametrize("activation", sorted(_LIMITS))
def test_epilogue_activations_at_infinity_and_nan(backend, activation):
    x = _SPECIAL[:, None].to(torch.ones(0).device)  # the test's device (cuda for triton on a GPU)
    out = matmul(x, torch.ones(1, 1), activation=activation, backend=backend)
    out = out.cpu()
    expect = torch.tensor(_LIMITS[activation], device="cpu")
    assert torch.equal(out[:, 0].isnan(), expect.isnan()), out[:, 0]
    ok = ~expect.isnan()
    # On a GPU the triton matmul takes fp32 through TF32 (enabled above: its contract), so
    # x * 1 rounds 1e30 to 9.9964e29 (3.6e-4 relative) before the epilogue sees it.
    tf32 = backend == "triton" and torch.cuda.is_available()
    rtol = 1e-3 if tf32 else 1e-6
    assert torch.allclose(out[ok, 0], expect[ok], rtol=rtol, atol=0), out[:, 0]
