"""Numba CPU decode attention against the float64 reference."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from ryzen_opt.kernels import BackendError, reference  # noqa: E402
from ryzen_opt.kernels import decode_attention as public_decode  # noqa: E402
from ryzen_opt.kernels.numba import decode_attention as nd  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402
from tests.kernels.numba_drivers import force_driver  # noqa: E402

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
    lens = np.array([4000])
    status, n_split, parallel = nd._plan(
        lens, (1, 1, 1, 4096, 64), 2, nd.PARALLEL_BYTES, nd.MIN_SPLIT
    )
    assert status == 0 and n_split > 1 and parallel
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


@pytest.fixture(params=["serial", "threaded"])
def driver(request, monkeypatch):
    """Run the call on the serial driver or on the thread pool, whatever its size."""
    yield from force_driver(request.param, monkeypatch, nd, "PARALLEL_BYTES")


# 1, primes, odd lengths, D off the 8- and 64-wide vector blocks (tails of the dot and axpy
# intrinsics), GQA groups, rows of length 0 and of the full cache.
@pytest.mark.parametrize(
    "b,hq,hkv,max_len,d,lengths",
    [
        (1, 1, 1, 1, 64, [1]),
        (1, 4, 4, 131, 64, [131]),
        (3, 4, 4, 257, 64, [257, 1, 0]),
        (2, 6, 3, 97, 72, [97, 89]),
        (1, 8, 2, 67, 136, [61]),
        (5, 2, 1, 23, 13, [23, 0, 7, 1, 19]),
        (1, 3, 3, 1031, 70, [1031]),
    ],
)
def test_decode_serial_and_threaded_drivers_match_reference(
    driver, b, hq, hkv, max_len, d, lengths
):
    q, k, v = _inputs(b, hq, hkv, max_len, d)
    for dtype in (torch.int64, torch.int32):
        cl = torch.tensor(lengths, dtype=dtype)
        assert_close_rel(
            nd.decode_attention(q, k, v, cl),
            _ref(q, k, v, cl),
            TOL_DEC,
            f"{driver} {(b, hq, hkv, max_len, d)} {lengths} {dtype}",
        )


@pytest.mark.parametrize("pairs", [1, 3])
def test_decode_split_keys_merge_matches_reference(driver, monkeypatch, pairs):
    # An odd number of (batch, kv head) pairs on 2 threads splits the keys; MIN_SPLIT=1 lets
    # short caches split too, so chunks of 1, 2 and uneven sizes are merged.
    monkeypatch.setattr(nd, "MIN_SPLIT", 1)
    for max_len, lengths in ((2, [2, 1, 2]), (9, [9, 5, 1]), (301, [301, 300, 2])):
        q, k, v = _inputs(3 if pairs == 3 else 1, 2, 1, max_len, 64)
        cl = torch.tensor(lengths[: q.shape[0]])
        assert_close_rel(
            nd.decode_attention(q, k, v, cl), _ref(q, k, v, cl), TOL_DEC, f"{driver} {lengths}"
        )
    lens = np.array([301, 300, 2][:pairs])
    status, n_split, parallel = nd._plan(lens, (pairs, 2, 1, 301, 64), 2, 0, 1)
    assert (status, n_split, parallel) == (0, 2, True)


def test_decode_strided_cache_views_match_reference(driver):
    # A (B, max_len, H, D) cache read as (B, H, max_len, D): key stride H*D, served in place.
    b, h, max_len, d = 2, 3, 41, 24
    kb, vb = torch.randn(b, max_len, h, d), torch.randn(b, max_len, h, d)
    k, v = kb.transpose(1, 2), vb.transpose(1, 2)
    q = torch.randn(b, d, h).transpose(1, 2)  # head dim strided: copied
    cl = torch.tensor([41, 17], dtype=torch.int32)
    assert_close_rel(nd.decode_attention(q, k, v, cl), _ref(q, k, v, cl), TOL_DEC, driver)
    # A cache longer than the lengths, sliced along max_len, and an offset start.
    big = torch.randn(b + 1, h, 2 * max_len, d)
    k, v = big[1:, :, :max_len], big[1:, :, max_len:]
    assert_close_rel(nd.decode_attention(q, k, v, cl), _ref(q, k, v, cl), TOL_DEC, driver)


def test_decode_extreme_scores_and_scales():
    # Scores far apart: every weight but one underflows; a zero and a negative scale.
    q, k, v = _inputs(2, 2, 2, 50, 32)
    k[0, 0, 7] = q[0, 0] * 40
    cl = torch.tensor([50, 33])
    for scale in (None, 0.0, -0.3, 3):
        assert_close_rel(
            nd.decode_attention(q, k, v, cl, scale),
            _ref(q, k, v, cl, scale),
            TOL_DEC,
            f"scale {scale}",
        )


def test_decode_lengths_out_of_range_raise_naming_cache_lengths(driver):
    q, k, v = _inputs(2, 2, 2, 6, 4)
    for bad in ([-1, 2], [6, 7], [0, -5]):
        for dtype in (torch.int64, torch.int32):
            with pytest.raises(ValueError, match="cache_lengths"):
                nd.decode_attention(q, k, v, torch.tensor(bad, dtype=dtype))
    with pytest.raises(ValueError, match="scale"):
        nd.decode_attention(q, k, v, torch.tensor([1, 2]), float("inf"))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        nd.decode_attention(q.numpy(), k, v, torch.tensor([1, 2]))


def test_decode_output_is_fresh_per_call():
    # No output buffer is reused between calls: an earlier result stays as it was.
    q, k, v = _inputs(1, 4, 4, 20, 16)
    cl = torch.tensor([20])
    first = nd.decode_attention(q, k, v, cl)
    keep = first.clone()
    second = nd.decode_attention(q * 2, k, v, cl)
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, keep)


@pytest.mark.parametrize("m,n,ld", [(1, 1, 1), (7, 5, 9), (8, 8, 8), (9, 64, 64), (33, 70, 75)])
def test_dot_axpy_max_intrinsics_match_float64(m, n, ld):
    from ryzen_opt.kernels.numba._common import _axpys, _dots, _max8

    rows = torch.randn(m * ld + 3).numpy()
    x = torch.randn(n).numpy()
    r = torch.from_numpy(rows[3:]).double()[: m * ld].reshape(m, ld)[:, :n]
    out = np.zeros(m, dtype=np.float32)
    _dots(x, rows, 3, ld, m, n, out)
    assert_close_rel(torch.from_numpy(out), r @ torch.from_numpy(x).double(), TOL_DEC, "dots")
    w = torch.randn(m).numpy()
    acc = torch.randn(n).numpy()
    want = torch.from_numpy(acc).double() + torch.from_numpy(w).double() @ r
    _axpys(w, rows, 3, ld, m, n, acc)
    assert_close_rel(torch.from_numpy(acc), want, TOL_DEC, "axpys")
    from numba import njit

    vmax = njit(lambda v, s, c: _max8(v, s, c))
    vals = torch.randn(8 * n).numpy()
    vals[5] = -np.inf
    assert vmax(vals, 0, 8 * n) == vals.max()
    assert vmax(vals, 8, 0) == -np.inf


@pytest.mark.parametrize("vw", [8, 16])
def test_dot_and_axpy_intrinsics_at_both_vector_widths(vw):
    # Both widths compile on any x86 host, so the AVX2 and AVX-512 forms are both checked.
    from numba import njit

    from ryzen_opt.kernels.numba._common import _make_axpy_rows, _make_dots8

    dots8 = _make_dots8(vw)
    pair = _make_axpy_rows(2, vw, pair=True)
    single = _make_axpy_rows(2, vw)

    @njit
    def run(x, rows, ld, n, out, w, acc, m):
        dots8(x, 0, rows, 3, ld, n, out, 1)
        pair(w, 0, rows, 3, ld, m, acc, 0)
        single(w, m, rows, 3 + m * ld, ld, 1, acc, 0)

    n, ld, m = 3 * vw, 3 * vw + 5, 6  # n a multiple of the width; rows further apart
    rows = torch.randn(8 * ld + 3).numpy()
    x = torch.randn(n).numpy()
    out = np.zeros(9, dtype=np.float32)
    w = torch.randn(m + 1).numpy()
    acc = torch.randn(2 * vw).numpy()
    r = torch.from_numpy(rows[3:]).double()[: 8 * ld].reshape(8, ld)
    want_acc = torch.from_numpy(acc).double() + torch.from_numpy(w).double() @ r[: m + 1, : 2 * vw]
    run(x, rows, ld, n, out, w, acc, m)
    want = r[:, :n] @ torch.from_numpy(x).double()
    assert_close_rel(torch.from_numpy(out[1:]), want, TOL_DEC, f"dots8 vw={vw}")
    assert out[0] == 0
    assert_close_rel(torch.from_numpy(acc), want_acc, TOL_DEC, f"axpy vw={vw}")
