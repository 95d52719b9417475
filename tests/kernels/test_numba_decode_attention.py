"""Numba CPU decode attention against the float64 reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from ryzen_opt.kernels import BackendError, reference  # noqa: E402
from ryzen_opt.kernels import decode_attention as public_decode  # noqa: E402
from ryzen_opt.kernels.numba import decode_attention as nd  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402

# Reordered sums over up to 5000 keys: measured <= 1.2e-6 (DESIGN's fp32 bound is 1e-4).
TOL_DEC = TOL["fp32_exact"]


@pytest.fixture(autouse=True)
def _poison():
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _ref(q, k, v, lengths, scale=None):
    return reference.decode_attention(q.double(), k.double(), v.double(), lengths, scale)


def _inputs(b, hq, hkv, max_len, d):
    return torch.randn(b, hq, d), torch.randn(b, hkv, max_len, d), torch.randn(b, hkv, max_len, d)


@pytest.mark.parametrize(
    "b,hq,hkv,max_len,d,lengths",
    [
        (1, 1, 1, 1, 1, [1]),
        (2, 4, 2, 10, 8, [0, 10]),
        (3, 6, 2, 701, 64, [1, 699, 701]),
        (1, 2, 2, 3001, 64, [2999]),
        (1, 1, 1, 5000, 16, [4097]),
        (2, 8, 1, 37, 7, [5, 37]),
    ],
)
def test_decode_matches_reference(b, hq, hkv, max_len, d, lengths):
    q, k, v = _inputs(b, hq, hkv, max_len, d)
    cl = torch.tensor(lengths)
    assert_close_rel(
        nd.decode_attention(q, k, v, cl),
        _ref(q, k, v, cl),
        TOL_DEC,
        f"{(b, hq, hkv, max_len, d)} {lengths}",
    )


def test_decode_sequence_split_is_used_and_matches():
    # batch*heads = 1 < threads: the cache is split along the sequence and merged.
    assert nd._n_split(1, 4096, 2) > 1
    q, k, v = _inputs(1, 1, 1, 4096, 64)
    cl = torch.tensor([4000], dtype=torch.int32)
    assert_close_rel(
        nd.decode_attention(q, k, v, cl, 0.2), _ref(q, k, v, cl, 0.2), TOL_DEC, "split"
    )


def test_decode_zero_length_rows_and_empty_batch():
    q, k, v = _inputs(2, 2, 2, 6, 4)
    out = nd.decode_attention(q, k, v, torch.tensor([0, 0]))
    assert torch.equal(out, torch.zeros(2, 2, 4))
    q, k, v = _inputs(0, 2, 2, 6, 4)
    assert nd.decode_attention(q, k, v, torch.zeros(0, dtype=torch.int64)).shape == (0, 2, 4)


def test_decode_non_contiguous_cache():
    big = torch.randn(2, 2, 50, 8)
    k, v = big[:, :, ::2], big[:, :, 1::2]  # (2, 2, 25, 8) strided views
    q = torch.randn(2, 4, 16)[:, :, ::2]
    cl = torch.tensor([25, 3])
    assert_close_rel(nd.decode_attention(q, k, v, cl), _ref(q, k, v, cl), TOL_DEC, "strided")


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    hkv=st.integers(1, 3),
    group=st.integers(1, 4),
    max_len=st.integers(1, 1300),
    d=st.integers(1, 70),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_decode_property_matches_reference(b, hkv, group, max_len, d, data, seed):
    torch.manual_seed(seed)
    lengths = data.draw(st.lists(st.integers(0, max_len), min_size=b, max_size=b))
    q, k, v = _inputs(b, hkv * group, hkv, max_len, d)
    cl = torch.tensor(lengths)
    assert_close_rel(nd.decode_attention(q, k, v, cl), _ref(q, k, v, cl), TOL_DEC, str(lengths))


def test_decode_bad_input_raises_naming_argument():
    q, k, v = _inputs(2, 2, 2, 6, 4)
    with pytest.raises(ValueError, match="cache_lengths"):
        nd.decode_attention(q, k, v, torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="cache_lengths"):
        nd.decode_attention(q, k, v, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="q must be"):
        nd.decode_attention(q[0], k, v, torch.tensor([1, 2]))


def test_decode_unsupported_dtype_raises_backend_error():
    q, k, v = (t.double() for t in _inputs(1, 2, 2, 6, 4))
    with pytest.raises(BackendError, match="float32"):
        public_decode(q, k, v, torch.tensor([3]), backend="numba")
