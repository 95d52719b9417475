"""Numba CPU lora_bgmv against the float64 reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from ryzen_opt.kernels import reference  # noqa: E402
from ryzen_opt.kernels.numba import lora as nl  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402

# Reordered fp32 sums (3x3 / 1x4 dot blocks, the register tile): measured <= 2e-7 on these
# shapes; DESIGN's bound for reordering fp32 kernels is 1e-4.
TOL_F32 = TOL[torch.float32]


def _inputs(rows, n_in, n_out, rank, n_adapters):
    x = torch.randn(rows, n_in)
    a = torch.randn(n_adapters, rank, n_in)
    b = torch.randn(n_adapters, n_out, rank)
    return x, a, b, torch.rand(n_adapters) + 0.5


def _ref(x, a, b, scales, indices):
    return reference.lora_bgmv(x.double(), a.double(), b.double(), scales.double(), indices)


def _mixed(rows, n_adapters, gen=None):
    """Every adapter and -1 present when rows allow, in a shuffled order."""
    idx = torch.arange(rows) % (n_adapters + 1) - 1
    return idx[torch.randperm(rows, generator=gen)]


def _check(x, a, b, s, idx, what=""):
    ref = _ref(x, a, b, s, idx)
    assert_close_rel(nl.lora_bgmv(x, a, b, s, idx), ref, TOL_F32, what, reduction=x.shape[1])
    base = torch.randn(ref.shape)
    out = base.clone()
    assert nl.lora_bgmv(x, a, b, s, idx, out=out) is out
    assert_close_rel(out, base.double() + ref, TOL_F32, what + " out+=", reduction=x.shape[1])


@pytest.mark.parametrize("n_adapters", [1, 4, 16])
@pytest.mark.parametrize("rank", [1, 8, 16, 64])
@pytest.mark.parametrize("rows,n_in,n_out", [(1, 256, 256), (7, 37, 41), (37, 131, 97)])
def test_lora_matches_reference_on_mixed_batches(rows, n_in, n_out, rank, n_adapters):
    x, a, b, s = _inputs(rows, n_in, n_out, rank, n_adapters)
    idx = _mixed(rows, n_adapters) if rows > 1 else torch.tensor([n_adapters - 1])
    _check(x, a, b, s, idx, f"{rows, n_in, n_out, rank, n_adapters}")


@pytest.mark.parametrize("rank", [3, 16, 21])
@pytest.mark.parametrize("rows", [12, 16, 23, 40])
def test_large_groups_take_the_register_tile_and_match(rows, rank):
    # One adapter for every row: groups of up to 16 rows, >= TILE_ROWS expand through the
    # register tile; 97 outputs leave a partial MR tile at the end.
    x, a, b, s = _inputs(rows, 130, 97, rank, 2)
    idx = torch.ones(rows, dtype=torch.int64)
    order, tasks, _ = nl._plan(idx.numpy(), 2, nl.ROWS_PER_TASK)
    assert max(tasks[:, 2] - tasks[:, 1]) >= nl.TILE_ROWS
    _check(x, a, b, s, idx, f"{rows} rows on one adapter")


@pytest.mark.parametrize("rank", [1, 8, 13, 24])
@pytest.mark.parametrize("n_out", [1, 8, 9, 63])
def test_small_groups_take_the_eight_output_dots_and_match(n_out, rank):
    # Groups below TILE_ROWS: _dot8 over the multiple-of-8 part of rank and of the outputs,
    # scalar tails for the rest.
    x, a, b, s = _inputs(5, 40, n_out, rank, 2)
    idx = torch.tensor([1, 0, 1, 1, 0])
    _check(x, a, b, s, idx, f"n_out {n_out} rank {rank}")


def test_plan_groups_every_row_once_by_adapter():
    idx = torch.tensor([2, -1, 0, 2, 2, -1, 1, 0] * 5)
    order, tasks, _ = nl._plan(idx.numpy(), 3, 4)
    assert sorted(order.tolist()) == list(range(len(idx)))
    seen = []
    for ad, lo, hi in tasks.tolist():
        assert 0 < hi - lo <= 4
        assert all(int(idx[r]) == ad for r in order[lo:hi])
        seen += order[lo:hi].tolist()
    assert sorted(seen) == list(range(len(idx)))


def test_all_rows_without_adapter_give_zeros_and_leave_out_untouched():
    x, a, b, s = _inputs(9, 33, 17, 8, 4)
    idx = torch.full((9,), -1)
    assert torch.equal(nl.lora_bgmv(x, a, b, s, idx), torch.zeros(9, 17))
    base = torch.randn(9, 17)
    out = base.clone()
    nl.lora_bgmv(x, a, b, s, idx, out=out)
    assert torch.equal(out, base)


def test_rows_without_adapter_are_exactly_zero_in_a_mixed_batch():
    x, a, b, s = _inputs(12, 40, 30, 8, 3)
    idx = torch.tensor([0, -1, 1, -1, 2, 2, -1, 0, 1, 1, -1, 0])
    delta = nl.lora_bgmv(x, a, b, s, idx)
    assert torch.equal(delta[idx == -1], torch.zeros(int((idx == -1).sum()), 30))


def test_non_contiguous_x_and_out():
    big = torch.randn(11, 2 * 53)
    x = big[:, ::2]  # (11, 53), column stride 2
    _, a, b, s = _inputs(11, 53, 29, 16, 4)
    idx = _mixed(11, 4)
    ref = _ref(x, a, b, s, idx)
    out = torch.randn(29, 11).t()  # (11, 29), column-major
    base = out.double()
    assert nl.lora_bgmv(x, a, b, s, idx, out=out) is out
    assert_close_rel(out, base + ref, TOL_F32, "strided", reduction=53)
    assert_close_rel(nl.lora_bgmv(x, a, b, s, idx), ref, TOL_F32, "strided x", reduction=53)


def test_empty_rows_and_zero_width():
    x, a, b, s = _inputs(0, 16, 8, 4, 2)
    idx = torch.zeros(0, dtype=torch.int64)
    assert nl.lora_bgmv(x, a, b, s, idx).shape == (0, 8)
    out = torch.zeros(0, 8)
    assert nl.lora_bgmv(x, a, b, s, idx, out=out) is out
    x, a, b, s = _inputs(3, 16, 0, 4, 2)
    assert nl.lora_bgmv(x, a, b, s, torch.tensor([0, 1, -1])).shape == (3, 0)


def test_serial_and_parallel_drivers_agree(monkeypatch):
    x, a, b, s = _inputs(40, 300, 200, 16, 4)
    idx = _mixed(40, 4)
    monkeypatch.setattr(nl, "SERIAL_BELOW", 1 << 62)
    serial = nl.lora_bgmv(x, a, b, s, idx)
    monkeypatch.setattr(nl, "SERIAL_BELOW", 0)
    parallel = nl.lora_bgmv(x, a, b, s, idx)
    assert torch.equal(serial, parallel)  # same tasks, same order of sums
    assert_close_rel(parallel, _ref(x, a, b, s, idx), TOL_F32, "parallel", reduction=300)


def test_index_out_of_range_raises_naming_indices():
    x, a, b, s = _inputs(3, 8, 6, 2, 4)
    with pytest.raises(ValueError, match="indices must lie"):
        nl.lora_bgmv(x, a, b, s, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="indices must lie"):
        nl.lora_bgmv(x, a, b, s, torch.tensor([0, -3, 1]))
    # Checked before any row is computed: out is left as it was.
    out = torch.randn(3, 6)
    base = out.clone()
    with pytest.raises(ValueError, match=r"got 9 at row 2"):
        nl.lora_bgmv(x, a, b, s, torch.tensor([0, 1, 9], dtype=torch.int32), out=out)
    assert torch.equal(out, base)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(0, 40),
    n_in=st.integers(1, 150),
    n_out=st.integers(1, 150),
    rank=st.integers(1, 70),
    n_adapters=st.integers(1, 16),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_lora_property_matches_reference(rows, n_in, n_out, rank, n_adapters, data, seed):
    torch.manual_seed(seed)
    indices = data.draw(st.lists(st.integers(-1, n_adapters - 1), min_size=rows, max_size=rows))
    x, a, b, s = _inputs(rows, n_in, n_out, rank, n_adapters)
    if data.draw(st.booleans()):  # a strided view of x
        x = torch.randn(rows, n_in + 3)[:, 2 : 2 + n_in]
    _check(x, a, b, s, torch.tensor(indices, dtype=torch.int64), str(indices))
