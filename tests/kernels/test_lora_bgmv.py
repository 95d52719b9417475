"""lora_bgmv: the reference's semantics and checks, and the public op's dispatch."""

import pytest
import torch

from ryzen_opt.kernels import BackendError, lora_bgmv, reference, registry


def _inputs(rows, n_in, n_out, rank, n_adapters, dtype=torch.float32):
    x = torch.randn(rows, n_in, dtype=dtype)
    a = torch.randn(n_adapters, rank, n_in, dtype=dtype)
    b = torch.randn(n_adapters, n_out, rank, dtype=dtype)
    scales = torch.rand(n_adapters) + 0.5
    return x, a, b, scales


def _per_row(x, a, b, scales, indices):
    """The definition, row by row: scales[i] * b[i] @ (a[i] @ x[r]), zeros for -1."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64)
    for r, i in enumerate(indices.tolist()):
        if i >= 0:
            out[r] = scales[i].double() * (b[i].double() @ (a[i].double() @ x[r].double()))
    return out


@pytest.mark.parametrize(
    "rows,n_in,n_out,rank,n_adapters,indices",
    [
        (1, 7, 5, 1, 1, [0]),
        (5, 13, 11, 8, 4, [3, -1, 0, 3, 1]),
        (6, 16, 9, 4, 2, [-1] * 6),
        (4, 9, 3, 2, 16, [15, 15, 0, 7]),
    ],
)
def test_reference_matches_the_row_by_row_definition(rows, n_in, n_out, rank, n_adapters, indices):
    x, a, b, scales = (t.double() for t in _inputs(rows, n_in, n_out, rank, n_adapters))
    idx = torch.tensor(indices)
    got = reference.lora_bgmv(x, a, b, scales, idx)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _per_row(x, a, b, scales, idx), rtol=1e-12, atol=1e-12)


def test_reference_adds_into_out_in_place_and_returns_it():
    x, a, b, scales = (t.double() for t in _inputs(3, 8, 6, 2, 2))
    idx = torch.tensor([1, -1, 0])
    base = torch.randn(3, 6, dtype=torch.float64)
    out = base.clone()
    got = reference.lora_bgmv(x, a, b, scales, idx, out=out)
    assert got is out
    torch.testing.assert_close(out, base + _per_row(x, a, b, scales, idx))
    assert torch.equal(out[1], base[1])  # a row without an adapter is untouched


def test_reference_empty_rows_and_int32_indices():
    x, a, b, scales = _inputs(0, 8, 6, 2, 2)
    assert reference.lora_bgmv(x, a, b, scales, torch.zeros(0, dtype=torch.int64)).shape == (0, 6)
    x, a, b, scales = _inputs(2, 8, 6, 2, 2)
    idx32 = torch.tensor([1, 0], dtype=torch.int32)
    torch.testing.assert_close(
        reference.lora_bgmv(x, a, b, scales, idx32).double(),
        _per_row(x, a, b, scales, idx32),
        rtol=1e-5,
        atol=1e-5,
    )


def _bad_calls():
    x, a, b, s = _inputs(3, 8, 6, 2, 4)
    idx = torch.tensor([0, -1, 3])
    return [
        ((x[0], a, b, s, idx), ValueError, "x must be 2-D"),
        ((x.long(), a, b, s, idx), TypeError, "x must be a floating"),
        ((x, a[:, :, :5], b, s, idx), ValueError, "a must be"),
        ((x, a, b[:3], s, idx), ValueError, "b must be"),
        ((x, a, b[:, :, :1], s, idx), ValueError, "b must be"),
        ((x, a, b, s[:2], idx), ValueError, "scales must be"),
        ((x, a, b, s, idx.float()), ValueError, "indices must be"),
        ((x, a, b, s, idx[:2]), ValueError, "indices must be"),
        ((x, a, b, s, torch.tensor([0, 4, 1])), ValueError, r"indices must lie in \[-1, 3\]"),
        ((x, a, b, s, torch.tensor([0, -2, 1])), ValueError, "indices must lie"),
        ((x, a.double(), b, s, idx), TypeError, "x, a, b must share a dtype"),
        ((x, a, b, [1.0] * 4, idx), TypeError, "scales must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_naming_the_argument(backend, case):
    args, error, match = _bad_calls()[case]
    with pytest.raises(error, match=match):
        lora_bgmv(*args, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_bad_out_raises_naming_out(backend):
    x, a, b, s = _inputs(3, 8, 6, 2, 4)
    idx = torch.tensor([0, -1, 3])
    with pytest.raises(ValueError, match=r"out must have shape \(3, 6\)"):
        lora_bgmv(x, a, b, s, idx, out=torch.zeros(3, 5), backend=backend)
    with pytest.raises(TypeError, match="out must have x's dtype"):
        lora_bgmv(x, a, b, s, idx, out=torch.zeros(3, 6, dtype=torch.float64), backend=backend)


def test_the_op_is_registered_with_numba_and_auto_falls_back_to_the_reference():
    assert "numba" in registry.backends("lora_bgmv")
    x, a, b, s = _inputs(4, 8, 6, 2, 3)
    idx = torch.tensor([2, 0, -1, 2])
    registry.clear_decisions()
    out = lora_bgmv(x, a, b, s, idx)
    assert registry.last_choice("lora_bgmv") == ("reference", "no measured decision for this shape")
    torch.testing.assert_close(out.double(), _per_row(x, a, b, s, idx), rtol=1e-5, atol=1e-5)


def test_auto_uses_a_recorded_numba_decision():
    x, a, b, s = _inputs(4, 8, 6, 2, 3)
    idx = torch.tensor([2, 0, -1, 2])
    key = registry.shape_key(x, a, b, s, idx)
    registry.record_decision("lora_bgmv", "cpu", key, "numba")
    try:
        out = lora_bgmv(x, a, b, s, idx)
    finally:
        registry.clear_decisions()
    assert registry.last_choice("lora_bgmv") == ("numba", "measured decision")
    torch.testing.assert_close(out.double(), _per_row(x, a, b, s, idx), rtol=1e-5, atol=1e-5)


def test_numba_refuses_bfloat16_with_the_reason():
    x, a, b, s = _inputs(2, 8, 6, 2, 2, dtype=torch.bfloat16)
    with pytest.raises(BackendError, match="float32"):
        lora_bgmv(x, a, b, s, torch.tensor([0, 1]), backend="numba")
