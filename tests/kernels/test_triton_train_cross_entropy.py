"""Triton fused linear + cross-entropy, forward and backward, against the float64 reference
``F.cross_entropy(F.linear(hidden, weight, bias), labels)``."""

import math

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels import reference  # noqa: E402
from ryzen_opt.kernels.triton.training import SUPPORTS, linear_cross_entropy  # noqa: E402
from ryzen_opt.kernels.triton.training import cross_entropy as ce  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402
from tests.kernels.train_check import DEVICE, check_fwd_bwd, leaf  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison():
    # torch.empty fills NaN in deterministic mode: unwritten outputs fail the comparison.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _labels(n, vocab, ignore_every=0, ignore_index=-100):
    lab = torch.randint(0, vocab, (n,), device=DEVICE)
    if ignore_every:
        lab[::ignore_every] = ignore_index
    return lab


def _check(n, h, vocab, dtype, *, bias=True, chunk_size=None, ignore_every=0, what=""):
    hid = leaf(n, h, dtype=dtype, scale=1.0)
    w = leaf(vocab, h, dtype=dtype, scale=h**-0.5 * 3)  # logits of spread ~3
    leaves = [hid, w] + ([leaf(vocab, dtype=dtype)] if bias else [])
    lab = _labels(n, vocab, ignore_every)

    def op(hd, wt, b=None):
        return linear_cross_entropy(hd, wt, lab, b, chunk_size=chunk_size)

    def ref(hd, wt, b=None):
        return reference.linear_cross_entropy(hd, wt, lab, b)

    # grad1 (weight) and grad2 (bias) sum over the rows.
    red = {"grad1": n, "grad2": n}
    check_fwd_bwd(op, ref, leaves, lambda ts: ts, dtype, what or f"{(n, h, vocab)}", red)


# (rows, hidden, vocab): a single row and word, primes, vocabularies past the interpreter's
# 128-wide tile (several online-softmax tiles, a partial last one).
SHAPES = [(1, 1, 1), (1, 8, 2), (7, 13, 37), (19, 16, 300), (33, 24, 129)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_matches_reference(shape, dtype):
    _check(*shape, dtype)


@pytest.mark.parametrize("chunk_size", [1, 5, 19, 64])
def test_every_chunk_size_gives_the_same_result(chunk_size):
    # 19 rows: chunks of 1, of 5 (a short last one), exactly one chunk, more than the rows.
    _check(19, 16, 300, torch.float32, chunk_size=chunk_size, ignore_every=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ignored_rows_count_for_nothing(dtype):
    _check(23, 16, 130, dtype, chunk_size=6, ignore_every=3, bias=False)


def test_custom_ignore_index_and_int32_labels():
    hid, w = leaf(10, 8, dtype=torch.float32), leaf(50, 8, dtype=torch.float32)
    lab = _labels(10, 50, ignore_every=2, ignore_index=7).to(torch.int32)
    lab[1] = 7
    out = linear_cross_entropy(hid, w, lab, ignore_index=7, chunk_size=3)
    ref = reference.linear_cross_entropy(
        hid.detach().double(), w.detach().double(), lab, ignore_index=7
    )
    assert math.isclose(out.item(), ref.item(), rel_tol=1e-5)


def test_all_rows_ignored_gives_nan_loss_and_zero_gradients_like_pytorch():
    hid, w = leaf(6, 8, dtype=torch.float32), leaf(20, 8, dtype=torch.float32)
    b = leaf(20, dtype=torch.float32)
    lab = torch.full((6,), -100, device=DEVICE)
    loss = linear_cross_entropy(hid, w, lab, b, chunk_size=4)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hid, w, b), lab)
    assert math.isnan(loss.item()) and math.isnan(ref.item())
    loss.backward()
    for t in (hid, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_leading_dims_and_non_contiguous_hidden():
    # (batch, seq, H) shifted by one, as a causal LM's loss reads it: hidden[:, :-1] is not
    # contiguous.
    dtype = torch.float32
    hid, w = leaf(2, 9, 16, dtype=dtype), leaf(70, 16, dtype=dtype, scale=0.5)
    ids = torch.randint(0, 70, (2, 9), device=DEVICE)
    lab = ids[:, 1:]

    def op(hd, wt):
        return linear_cross_entropy(hd[:, :-1], wt, lab, chunk_size=5)

    def ref(hd, wt):
        return reference.linear_cross_entropy(hd[:, :-1], wt, lab)

    check_fwd_bwd(op, ref, [hid, w], lambda ts: ts, dtype, "shifted", {"grad1": 16})
    wt_t = leaf(16, 70, dtype=dtype, scale=0.5)  # a transposed weight view

    def op_t(hd, wtt):
        return linear_cross_entropy(hd, wtt.t(), lab, chunk_size=4)

    def ref_t(hd, wtt):
        return reference.linear_cross_entropy(hd, wtt.t(), lab)

    check_fwd_bwd(op_t, ref_t, [leaf(2, 8, 16, dtype=dtype), wt_t], lambda ts: ts, dtype, "wt")


def test_frozen_weight_and_hidden_only():
    hid = leaf(5, 8, dtype=torch.float32)
    w = leaf(40, 8, dtype=torch.float32, grad=False)
    lab = _labels(5, 40)
    linear_cross_entropy(hid, w, lab).backward()
    assert w.grad is None and hid.grad is not None
    hd = hid.detach().double().requires_grad_()
    reference.linear_cross_entropy(hd, w.double(), lab).backward()
    # fp32 against float64 at the fp32 tolerance (float64's own 1e-7 failed on the GPU's
    # reduction order by 1.6e-7 in one element of 40).
    assert_close_rel(hid.grad, hd.grad, TOL[torch.float32], "hidden grad", reduction=40)


def test_no_grad_computes_only_the_loss():
    hid, w = leaf(9, 8, dtype=torch.float32), leaf(40, 8, dtype=torch.float32)
    lab = _labels(9, 40)
    with torch.no_grad():
        out = linear_cross_entropy(hid, w, lab, chunk_size=4)
    assert not out.requires_grad
    ref = reference.linear_cross_entropy(hid.detach().double(), w.detach().double(), lab)
    assert math.isclose(out.item(), ref.item(), rel_tol=1e-5)


def test_default_chunk_size_bounds_the_logits_buffer():
    assert ce.default_chunk_size(4096, 32000) == 1024  # 2**25 logits: 1024 x 32000 < 2**25
    assert ce.default_chunk_size(10, 32000) == 10
    assert ce.default_chunk_size(10**6, 2**26) == 1
    assert ce.default_chunk_size(0, 5) == 1


def test_bad_input_names_the_argument():
    hid, w = torch.randn(4, 8, device=DEVICE), torch.randn(30, 8, device=DEVICE)
    lab = torch.randint(0, 30, (4,), device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_cross_entropy(hid, w[:, :7], lab)
    with pytest.raises(ValueError, match="labels must have hidden's leading shape"):
        linear_cross_entropy(hid, w, lab[:3])
    with pytest.raises(TypeError, match="labels must be int64 or int32"):
        linear_cross_entropy(hid, w, lab.float())
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        linear_cross_entropy(hid, w.half(), lab)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_cross_entropy(hid, w, lab, torch.randn(29, device=DEVICE))
    with pytest.raises(ValueError, match="chunk_size must be"):
        linear_cross_entropy(hid, w, lab, chunk_size=0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        linear_cross_entropy(hid, w, lab, ignore_index=1.5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 30\).*found 30"):
        linear_cross_entropy(hid, w, torch.tensor([0, 30, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="found -1"):
        linear_cross_entropy(hid, w, torch.tensor([0, -1, 1, 2], device=DEVICE))
    with pytest.raises(TypeError, match="hidden is torch.float64"):
        linear_cross_entropy(hid.double(), w.double(), lab)
    with pytest.raises(ValueError, match="hidden is on meta"):
        meta = torch.empty(4, 8, device="meta")
        linear_cross_entropy(meta, torch.empty(30, 8, device="meta"), lab.to("meta"))


def test_supports_gives_the_reason_or_none():
    hid, w = torch.empty(4, 8, device="meta"), torch.empty(30, 8, device="meta")
    lab = torch.empty(4, dtype=torch.long, device="meta")
    assert SUPPORTS["linear_cross_entropy"](hid, w, lab) is None
    assert "float64" in SUPPORTS["linear_cross_entropy"](hid.double(), w.double(), lab)


def test_out_of_range_label_without_the_check_gives_nan_loss():
    # Under torch.compile or graph capture the wrapper does not sync to check labels: the op
    # itself marks such a row's loss NaN rather than reading outside the row.
    hid, w = torch.randn(4, 8, device=DEVICE), torch.randn(30, 8, device=DEVICE)
    for bad in (30, -1):
        lab = torch.tensor([0, bad, 1, 2], device=DEVICE)
        loss, *_ = torch.ops.ryzen_opt.train_linear_cross_entropy(
            hid, w, lab, None, -100, 3, False, False, False
        )
        assert torch.isnan(loss)
    lab = torch.tensor([0, 5, 1, 2], device=DEVICE)
    loss, *_ = torch.ops.ryzen_opt.train_linear_cross_entropy(
        hid, w, lab, None, -100, 3, False, False, False
    )
    assert torch.isfinite(loss)
