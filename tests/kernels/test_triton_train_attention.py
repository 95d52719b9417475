"""Triton training flash attention (forward + flash backward) against float64 autograd
through the reference attention."""

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels import reference  # noqa: E402
from ryzen_opt.kernels.triton.training import SUPPORTS  # noqa: E402
from ryzen_opt.kernels.triton.training.attention_op import attention  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402
from tests.kernels.train_check import DEVICE, check_fwd_bwd, leaf  # noqa: E402


@pytest.fixture(autouse=True)
def _poison():
    # torch.empty fills NaN in deterministic mode: unwritten outputs fail the comparison.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checked at the fp32 tolerance
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


CASES = [
    # (b, hq, hkv, lq, lk, d, causal); the interpreter's tiles are 16 (backward: 16 x 32).
    (1, 1, 1, 1, 1, 16, False),
    (1, 2, 2, 17, 17, 32, False),
    (2, 4, 2, 37, 53, 16, True),  # GQA, q_len < k_len: bottom-right diagonal
    (1, 3, 1, 33, 33, 24, True),  # MQA, head_dim not a power of two
    (1, 2, 1, 1, 29, 16, True),  # one query row (sees every key)
    (2, 2, 2, 19, 5, 16, False),  # fewer keys than one tile
    # whole tiles run unmasked beside the masked ones (the backward's split):
    (1, 2, 1, 70, 75, 24, True),  # head_dim not a power of two, tails on both sides
    (1, 2, 2, 64, 80, 16, False),  # whole query tiles, a key tail
    (1, 2, 1, 80, 70, 16, True),  # q_len > k_len: the first rows see no key
]


def _ref(causal):
    return lambda q, k, v: reference.attention(q, k, v, causal=causal)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_forward_and_backward_match_reference(case, dtype):
    b, hq, hkv, lq, lk, d, causal = case
    q, k, v = (
        leaf(b, hq, lq, d, dtype=dtype),
        leaf(b, hkv, lk, d, dtype=dtype),
        leaf(b, hkv, lk, d, dtype=dtype),
    )
    check_fwd_bwd(
        lambda q, k, v: attention(q, k, v, causal=causal),
        _ref(causal),
        [q, k, v],
        lambda ts: ts,
        dtype,
        f"{case}",
        # dq is the softmax backward's cancellation dP - delta (each a head_dim-long dot
        # product; exactly 0 with a single key); dk, dv sum over the query rows.
        {"grad0": d, "grad1": lq, "grad2": lq},
    )


# The interpreter's numpy log2(0) warns for the log-sum-exp of a row that sees no key (-inf,
# the defined value).
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
def test_rows_that_see_no_key_are_zero_and_pass_no_gradient():
    # Causal with q_len 40 > k_len 13: the first 27 rows see no key. The reference's softmax
    # of an all -inf row has NaN gradients, so the rows that see keys are checked against the
    # reference of those rows alone, and the others must be exactly zero.
    q, k, v = (
        leaf(1, 2, 40, 16, dtype=torch.float32),
        leaf(1, 2, 13, 16, dtype=torch.float32),
        (leaf(1, 2, 13, 16, dtype=torch.float32)),
    )
    o = attention(q, k, v, causal=True)
    g = torch.randn_like(o)
    o.backward(g)
    assert torch.equal(o[:, :, :27], torch.zeros_like(o[:, :, :27]))
    assert torch.equal(q.grad[:, :, :27], torch.zeros_like(q.grad[:, :, :27]))
    qd, kd, vd = [t.detach().double().requires_grad_() for t in (q, k, v)]
    qs = qd[:, :, 27:]
    ref = reference.attention(qs, kd, vd, causal=True)
    ref.backward(g[:, :, 27:].double())
    tol = TOL[torch.float32]
    assert_close_rel(o[:, :, 27:], ref, tol, "o")
    assert_close_rel(q.grad[:, :, 27:], qd.grad[:, :, 27:], tol, "dq")
    assert_close_rel(k.grad, kd.grad, tol, "dk")
    assert_close_rel(v.grad, vd.grad, tol, "dv")


def test_non_contiguous_projections_and_custom_scale():
    # q, k, v as a model gives them: (b, seq, heads, d) views transposed to SDPA layout.
    dtype = torch.float32
    qs, ks, vs = (
        leaf(2, 21, 4, 32, dtype=dtype),
        leaf(2, 21, 2, 32, dtype=dtype),
        leaf(2, 21, 2, 32, dtype=dtype),
    )

    def build(ts):
        return tuple(t.transpose(1, 2) for t in ts)

    check_fwd_bwd(
        lambda q, k, v: attention(q, k, v, causal=True, scale=0.3),
        lambda q, k, v: reference.attention(q, k, v, causal=True, scale=0.3),
        [qs, ks, vs],
        build,
        dtype,
        "strided",
    )


@pytest.mark.parametrize("scale", [-0.5, 0.0])
def test_negative_and_zero_scale(scale):
    # A negative scale keeps the scale-first forward (the row max of scaled scores is the raw
    # scores' min); zero takes the folded one. Forward, log-sum-exp and the backward agree.
    f32 = torch.float32
    q, k, v = (
        leaf(1, 2, 37, 16, dtype=f32),
        leaf(1, 1, 45, 16, dtype=f32),
        leaf(1, 1, 45, 16, dtype=f32),
    )
    check_fwd_bwd(
        lambda q, k, v: attention(q, k, v, causal=True, scale=scale),
        lambda q, k, v: reference.attention(q, k, v, causal=True, scale=scale),
        [q, k, v],
        lambda ts: ts,
        torch.float32,
        f"scale={scale}",
    )


def test_empty_keys_and_queries():
    q, k = leaf(1, 2, 5, 16, dtype=torch.float32), leaf(1, 2, 0, 16, dtype=torch.float32)
    v = leaf(1, 2, 0, 16, dtype=torch.float32)
    o = attention(q, k, v)
    assert torch.equal(o, torch.zeros_like(o))
    o.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    q0, k3 = leaf(1, 2, 0, 16, dtype=torch.float32), leaf(1, 2, 3, 16, dtype=torch.float32)
    assert attention(q0, k3, k3).shape == (1, 2, 0, 16)


def test_bad_input_names_the_argument():
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="k and v must have one shape"):
        attention(q, q, q[:, :, :4])
    with pytest.raises(ValueError, match="must divide q's heads"):
        attention(torch.randn(1, 3, 5, 16, device=DEVICE), q, q)
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, q.half(), q.half())
    with pytest.raises(ValueError, match="head_dim is 256"):
        big = torch.randn(1, 1, 2, 256, device=DEVICE)
        attention(big, big, big)
    with pytest.raises(ValueError, match="scale must be finite"):
        attention(q, q, q, scale=float("inf"))
    with pytest.raises(ValueError, match="q is on meta"):
        m = torch.empty(1, 2, 5, 16, device="meta")
        attention(m, m, m)


def test_supports_gives_the_reason_or_none():
    q = torch.empty(1, 2, 5, 16, device="meta")
    assert SUPPORTS["attention"](q, q, q) is None
    assert "float64" in SUPPORTS["attention"](q.double(), q.double(), q.double())
    big = torch.empty(1, 1, 2, 256, device="meta")
    assert "head_dim" in SUPPORTS["attention"](big, big, big)


@pytest.mark.parametrize(
    "case",
    [
        (2, 4, 2, 37, 53, 16, True),  # GQA, q_len < k_len
        (1, 8, 2, 40, 70, 16, True),  # 4 query heads a KV head
        (1, 6, 1, 21, 33, 24, False),  # MQA, 6 query heads
    ],
)
def test_dkdv_split_over_query_heads_matches_reference(monkeypatch, case):
    """Every divisor of the group as the number of dK/dV shares: each matches float64, and
    the shares' sums agree with the one-program-per-KV-head kernel."""
    from ryzen_opt.kernels.triton.training import attention_op

    b, hq, hkv, lq, lk, d, causal = case
    groups = hq // hkv
    torch.manual_seed(1)
    inputs = [
        leaf(b, hq, lq, d, dtype=torch.float32),
        leaf(b, hkv, lk, d, dtype=torch.float32),
        leaf(b, hkv, lk, d, dtype=torch.float32),
    ]
    grads = {}
    for shares in [s for s in range(1, groups + 1) if groups % s == 0]:
        monkeypatch.setattr(attention_op, "_DKDV_SHARES", shares)
        check_fwd_bwd(
            lambda q, k, v: attention(q, k, v, causal=causal),
            _ref(causal),
            inputs,
            lambda ts: ts,
            torch.float32,
            f"{case} shares={shares}",
            {"grad0": d, "grad1": lq, "grad2": lq},
        )
        q, k, v = (t.detach().clone().requires_grad_(True) for t in inputs)
        attention(q, k, v, causal=causal).square().sum().backward()
        grads[shares] = (k.grad, v.grad)
    for shares, (dk, dv) in grads.items():
        # the same fp32 products, summed in another grouping: the fp32 tolerance
        assert_close_rel(dk, grads[1][0], TOL[torch.float32], f"dk shares={shares}")
        assert_close_rel(dv, grads[1][1], TOL[torch.float32], f"dv shares={shares}")


def test_dkdv_split_choice():
    from ryzen_opt.kernels.triton.training.attention_op import _dkdv_split

    # (programs with one share, groups, SMs, causal, rows walked with one share): causal
    # only; the fewest shares dividing the group that give 4 programs an SM or walks of at
    # most 4096 rows, else the whole group
    assert _dkdv_split(256, 8, 132, True, 2048 * 8) == 4  # the train_kernels bench shape
    assert _dkdv_split(512, 4, 132, True, 4096 * 4) == 2
    assert _dkdv_split(512, 4, 132, True, 1024 * 4) == 1  # short walks: not split
    assert _dkdv_split(256, 8, 132, False, 4096 * 8) == 1  # no causal imbalance
    assert _dkdv_split(100, 6, 132, True, 10**6) == 6
    assert _dkdv_split(10, 1, 132, True, 10**6) == 1  # no grouping: nothing to split


def test_dkdv_forced_shares_must_divide_the_group(monkeypatch):
    from ryzen_opt.kernels.triton.training import attention_op

    monkeypatch.setattr(attention_op, "_DKDV_SHARES", 3)
    with pytest.raises(ValueError, match="does not divide 4"):
        attention_op._dkdv_split(8, 4, 132, True, 8192)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
@pytest.mark.parametrize(
    "case",
    [
        (2, 4, 2, 37, 53, 16, True),
        (1, 2, 1, 70, 75, 24, True),
        (1, 2, 2, 64, 80, 16, False),
        (1, 2, 1, 80, 70, 16, True),
    ],
)
def test_unmasked_backward_tiles_give_the_masked_kernels_gradients(monkeypatch, case):
    """The backward's whole tiles skip the masks (``_SPLIT_MASKS``): the gradients equal
    those of the kernels that mask every tile (exactly under the interpreter: the same
    products in the same order; on a GPU the compiler may contract them differently)."""
    from ryzen_opt.kernels.triton import _common as tcommon
    from ryzen_opt.kernels.triton.training import attention_op

    b, hq, hkv, lq, lk, d, causal = case
    torch.manual_seed(2)
    inputs = [leaf(b, h, n, d, dtype=torch.float32) for h, n in ((hq, lq), (hkv, lk), (hkv, lk))]
    grads = {}
    for split in (False, True):
        monkeypatch.setattr(attention_op, "_SPLIT_MASKS", split)
        q, k, v = (t.detach().clone().requires_grad_(True) for t in inputs)
        attention(q, k, v, causal=causal).square().sum().backward()
        grads[split] = (q.grad, k.grad, v.grad)
    for name, got, want in zip("qkv", grads[True], grads[False], strict=True):
        if tcommon.INTERPRET:
            assert torch.equal(got, want), f"d{name} {case}"
        else:
            assert_close_rel(got, want, TOL[torch.float32], f"d{name} {case}")
