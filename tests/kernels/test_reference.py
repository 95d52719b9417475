"""The reference ops: the ground truth every backend is tested against."""

import math

import pytest
import torch
import torch.nn.functional as F

from ryzen_opt.kernels import reference as ref
from tests.assertions import assert_close_rel


def _naive_attention(q, k, v, causal, scale=None):
    # Straight from the definition, in float64, with explicit loops over heads.
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, hq, lq, d, dtype=torch.float64)
    for h in range(hq):
        kh, vh = k[:, h // (hq // hk)].double(), v[:, h // (hq // hk)].double()
        s = q[:, h].double() @ kh.transpose(-1, -2) * scale
        if causal:
            for i in range(lq):
                s[:, i, i + (lk - lq) + 1 :] = float("-inf")
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out[:, h] = p @ vh
    return out


@pytest.mark.parametrize("shape", [(1, 1, 1), (17, 113, 5), (3, 64, 255)])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "silu", "relu"])
def test_matmul_epilogue_matches_definition(shape, act):
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    bias, res = torch.randn(n, dtype=torch.float64), torch.randn(m, n, dtype=torch.float64)
    out = ref.matmul(a, b, bias, act, res)
    expect = ref.apply_activation(a @ b + bias, act) + res
    assert_close_rel(out, expect, 1e-12)


def test_matmul_batched_and_out_dtype():
    a, b = torch.randn(3, 5, 7), torch.randn(3, 7, 2)
    out = ref.matmul(a, b, out_dtype=torch.float64)
    assert out.dtype == torch.float64 and out.shape == (3, 5, 2)


@pytest.mark.parametrize(("lq", "lk"), [(16, 16), (5, 16), (1, 9), (7, 7)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_attention_matches_definition_with_gqa_and_bottom_right_causal(lq, lk, causal, heads):
    hq, hk = heads
    q = torch.randn(2, hq, lq, 8, dtype=torch.float64)
    k, v = (
        torch.randn(2, hk, lk, 8, dtype=torch.float64),
        torch.randn(2, hk, lk, 8, dtype=torch.float64),
    )
    assert_close_rel(ref.attention(q, k, v, causal), _naive_attention(q, k, v, causal), 1e-12)


def test_attention_equals_sdpa_when_lengths_match():
    q, k, v = (torch.randn(2, 3, 11, 16) for _ in range(3))
    assert_close_rel(
        ref.attention(q, k, v, True), F.scaled_dot_product_attention(q, k, v, is_causal=True), 1e-5
    )


def test_causal_rows_that_see_no_key_are_zero():
    q, k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    out = ref.attention(q, k, v, causal=True)  # lq > lk: the first 3 rows see nothing
    assert torch.equal(out[0, 0, :3], torch.zeros(3, 4))
    assert not torch.isnan(out).any()


def test_decode_attention_matches_attention_over_each_rows_prefix():
    b, h, length, d = 3, 4, 20, 8
    q = torch.randn(b, h, d, dtype=torch.float64)
    kc, vc = (
        torch.randn(b, 2, length, d, dtype=torch.float64),
        torch.randn(b, 2, length, d, dtype=torch.float64),
    )
    lengths = torch.tensor([20, 7, 1])
    out = ref.decode_attention(q, kc, vc, lengths)
    for i, n in enumerate(lengths.tolist()):
        row = ref.attention(q[i : i + 1, :, None], kc[i : i + 1, :, :n], vc[i : i + 1, :, :n])
        assert_close_rel(out[i : i + 1], row[:, :, 0], 1e-12)


def test_layer_norm_with_residual_returns_the_sum():
    x, r = torch.randn(4, 6), torch.randn(4, 6)
    w, bias = torch.randn(6), torch.randn(6)
    out, h = ref.layer_norm(x, w, bias, 1e-5, r)
    assert torch.equal(h, x + r)
    assert_close_rel(out, F.layer_norm(x + r, (6,), w, bias, 1e-5), 1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ref.matmul(torch.randn(2, 3), torch.randn(4, 2)), "a's last dim"),
        (lambda: ref.matmul(torch.randn(2, 3), torch.randn(3, 2).double()), "dtype"),
        (lambda: ref.matmul(torch.randn(2, 3), torch.randn(3, 2), bias=torch.randn(3)), "bias"),
        (lambda: ref.matmul(torch.randn(2, 3), torch.randn(3, 2), activation="tanh"), "activation"),
        (
            lambda: ref.matmul(torch.randn(2, 3), torch.randn(3, 2), residual=torch.randn(3, 2)),
            "residual",
        ),
        (lambda: ref.matmul(torch.randn(3), torch.randn(3, 2)), "2-D"),
        (
            lambda: ref.attention(
                torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
            ),
            "divide",
        ),
        (
            lambda: ref.attention(
                torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
            ),
            "head_dim",
        ),
        (
            lambda: ref.attention(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)),
            "4-D",
        ),
        (
            lambda: ref.decode_attention(
                torch.randn(1, 2, 8),
                torch.randn(1, 2, 5, 8),
                torch.randn(1, 2, 5, 8),
                torch.tensor([6]),
            ),
            "cache_lengths",
        ),
        (
            lambda: ref.decode_attention(
                torch.randn(1, 2, 8),
                torch.randn(1, 2, 5, 8),
                torch.randn(1, 2, 5, 8),
                torch.tensor([2.0]),
            ),
            "cache_lengths",
        ),
        (lambda: ref.layer_norm(torch.randn(2, 4), torch.randn(3), None), "weight"),
        (
            lambda: ref.layer_norm(torch.randn(2, 4), None, None, 1e-5, torch.randn(2, 3)),
            "residual",
        ),
    ],
)
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
