"""Numba CPU attention against the float64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from ryzen_opt.kernels import BackendError, reference  # noqa: E402
from ryzen_opt.kernels import attention as public_attention  # noqa: E402
from ryzen_opt.kernels.numba import attention as na  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402

# Online softmax reorders the sums and exp is a polynomial (rel. error < 2e-7), so DESIGN
# allows fp32 1e-4; measured errors are <= 3e-7 here, so 1e-5 is used to catch bugs.
TOL_AT = TOL["fp32_exact"]


@pytest.fixture(autouse=True)
def _poison():
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _ref(q, k, v, causal=False, scale=None, attn_mask=None):
    m = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    return reference.attention(q.double(), k.double(), v.double(), causal, scale, m)


def _qkv(b, hq, hkv, lq, lk, d):
    return torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)


# Lengths straddle BQ=48 and BK=128 (several key blocks a row) and the tiles; lq != lk both ways.
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "b,hq,hkv,lq,lk,d",
    [
        (1, 1, 1, 1, 1, 1),
        (2, 4, 2, 5, 7, 8),
        (1, 2, 1, 7, 5, 16),
        (1, 2, 2, 97, 389, 64),
        (1, 3, 1, 193, 193, 37),
        (1, 1, 1, 50, 3, 8),
        # head dims of whole GEMM_NR panels (V read in place): one and three 32-wide panels
        (2, 4, 2, 45, 70, 32),
        (1, 2, 1, 61, 61, 96),
    ],
)
def test_attention_matches_reference_on_odd_shapes(b, hq, hkv, lq, lk, d, causal):
    q, k, v = _qkv(b, hq, hkv, lq, lk, d)
    assert_close_rel(
        na.attention(q, k, v, causal),
        _ref(q, k, v, causal),
        TOL_AT,
        f"{(b, hq, hkv, lq, lk, d)} causal={causal}",
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 4, 2, 100, 450, 32),  # GQA; V read in place (head dim a whole number of panels)
        (1, 4, 1, 100, 450, 24),  # one KV head; head dim 24: V packed
    ],
)
def test_attention_serial_and_parallel_paths_agree_with_reference(threads, shape):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)  # 1 thread: the serial kernel; 2: the prange kernel
    try:
        q, k, v = _qkv(*shape)
        out = na.attention(q, k, v, True)
        assert_close_rel(out, _ref(q, k, v, True), TOL_AT, f"{threads} threads {shape}")
    finally:
        torch.set_num_threads(prev)


def test_attention_causal_rows_that_see_no_key_are_zero():
    # lq > lk, bottom-right aligned: the first lq - lk rows see nothing.
    q, k, v = _qkv(1, 2, 2, 9, 4, 8)
    out = na.attention(q, k, v, causal=True)
    assert torch.equal(out[:, :, :5], torch.zeros(1, 2, 5, 8))
    assert_close_rel(out, _ref(q, k, v, True), TOL_AT, "lq > lk causal")


def test_attention_matches_sdpa_when_lengths_are_equal():
    q, k, v = _qkv(2, 4, 4, 130, 130, 32)
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_close_rel(na.attention(q, k, v, True), sdpa, TOL_AT, "vs SDPA")


def test_attention_boolean_and_float_masks():
    q, k, v = _qkv(2, 2, 1, 9, 11, 8)
    mask = torch.rand(2, 1, 1, 11) > 0.3  # key padding, broadcast over heads and queries
    mask[0, 0, 0, :] = False  # batch 0 sees nothing
    for causal in (False, True):
        out = na.attention(q, k, v, causal, attn_mask=mask)
        assert_close_rel(out, _ref(q, k, v, causal, attn_mask=mask), TOL_AT, f"bool {causal}")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    fmask = torch.randn(9, 11)
    out = na.attention(q, k, v, False, 0.3, attn_mask=fmask)
    assert_close_rel(out, _ref(q, k, v, False, 0.3, fmask), TOL_AT, "float mask")


def test_attention_non_contiguous_and_empty():
    base = torch.randn(1, 6, 3, 20, 16)
    q, k, v = (base[:, i].transpose(1, 2)[:, :, :19] for i in (0, 2, 4))  # (1, 20, 3, 16)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (1, 3, 19, 16), strided
    assert_close_rel(na.attention(q, k, v, True), _ref(q, k, v, True), TOL_AT, "strided")
    q, k, v = _qkv(1, 2, 2, 0, 5, 4)
    assert na.attention(q, k, v).shape == (1, 2, 0, 4)
    q, k, v = _qkv(1, 2, 2, 3, 0, 4)
    assert torch.equal(na.attention(q, k, v), torch.zeros(1, 2, 3, 4))


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    lq=st.integers(1, 80),
    lk=st.integers(1, 240),
    d=st.integers(1, 70),
    causal=st.booleans(),
    scaled=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_attention_property_matches_reference(b, hkv, group, lq, lk, d, causal, scaled, seed):
    torch.manual_seed(seed)
    q, k, v = _qkv(b, hkv * group, hkv, lq, lk, d)
    scale = 0.5 / math.sqrt(d) if scaled else None
    out = na.attention(q, k, v, causal, scale)
    assert_close_rel(out, _ref(q, k, v, causal, scale), TOL_AT, f"{q.shape} {k.shape}")


def test_attention_bad_input_raises_naming_argument():
    q, k, v = _qkv(1, 2, 2, 3, 4, 8)
    with pytest.raises(ValueError, match="q must be 4-D"):
        na.attention(q[0], k, v)
    with pytest.raises(ValueError, match="k's heads"):
        na.attention(torch.randn(1, 3, 3, 8), k, v)
    with pytest.raises(ValueError, match="attn_mask"):
        na.attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool))


def test_attention_unsupported_dtype_raises_backend_error():
    q, k, v = (t.double() for t in _qkv(1, 2, 2, 3, 4, 8))
    with pytest.raises(BackendError, match="float32"):
        public_attention(q, k, v, backend="numba")
