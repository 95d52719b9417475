"""Triton rotary embedding (HF Llama convention), forward and backward, against the float64
reference."""

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels import reference  # noqa: E402
from ryzen_opt.kernels.triton.training import SUPPORTS, rotary  # noqa: E402
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


def _llama_tables(batch, seq, d, dtype, offsets=None):
    """HF Llama's cos/sin: cat(freqs, freqs) of positions (per batch row when offsets)."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(seq, dtype=torch.float32)[None, :].repeat(batch, 1)
    if offsets is not None:
        pos = pos + torch.tensor(offsets, dtype=torch.float32)[:, None]
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


CASES = [
    # (batch, q_heads, kv_heads, seq, head_dim)
    (1, 1, 1, 1, 2),
    (2, 4, 2, 17, 64),  # GQA
    (1, 3, 1, 37, 48),  # head_dim/2 = 24: not a power of two
    (2, 2, 2, 130, 8),  # seq past one BLOCK_S tile
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_reference(case, dtype):
    b, hq, hk, s, d = case
    q, k = leaf(b, hq, s, d, dtype=dtype), leaf(b, hk, s, d, dtype=dtype)
    cos, sin = _llama_tables(b, s, d, dtype, offsets=[3 * i for i in range(b)])
    check_fwd_bwd(
        rotary,
        reference.rotary,
        [q, k],
        lambda ts: (*ts, cos.to(ts[0].dtype), sin.to(ts[0].dtype)),
        dtype,
        f"{case}",
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_broadcast_batch_and_unequal_halves(dtype):
    # cos/sin of batch 1 broadcast over batch 3; random tables (halves differ) check the
    # general transpose in backward, not only the inverse rotation.
    q, k = leaf(3, 2, 9, 16, dtype=dtype), leaf(3, 1, 9, 16, dtype=dtype)
    cos, sin = torch.randn(1, 9, 16, device=DEVICE), torch.randn(1, 9, 16, device=DEVICE)
    check_fwd_bwd(
        rotary,
        reference.rotary,
        [q, k],
        lambda ts: (*ts, cos.to(ts[0].dtype), sin.to(ts[0].dtype)),
        dtype,
        "bcast",
    )


def test_rotary_non_contiguous_q_k_and_tables():
    # q, k as the projections give them: (batch, seq, heads, d) transposed to SDPA layout;
    # cos/sin a strided slice of a longer table.
    dtype = torch.float32
    qs, ks = leaf(2, 11, 4, 32, dtype=dtype), leaf(2, 11, 2, 32, dtype=dtype)
    cos, sin = _llama_tables(2, 20, 32, dtype)
    cos, sin = cos[:, 5:16], sin[:, 5:16]
    check_fwd_bwd(
        rotary,
        reference.rotary,
        [qs, ks],
        lambda ts: (ts[0].transpose(1, 2), ts[1].transpose(1, 2), cos, sin),
        dtype,
        "nc",
    )


def test_rotary_float32_tables_with_bfloat16_q_k():
    q, k = leaf(1, 2, 5, 8, dtype=torch.bfloat16), leaf(1, 2, 5, 8, dtype=torch.bfloat16)
    cos, sin = _llama_tables(1, 5, 8, torch.float32)
    qr, kr = rotary(q, k, cos, sin)
    assert qr.dtype == kr.dtype == torch.bfloat16


def test_rotary_gradient_for_q_only():
    q, k = leaf(1, 2, 5, 8, dtype=torch.float32), leaf(1, 2, 5, 8, dtype=torch.float32)
    cos, sin = _llama_tables(1, 5, 8, torch.float32)
    qr, _ = rotary(q, k, cos, sin)
    qr.sum().backward()
    qd = q.detach().double().requires_grad_()
    reference.rotary(qd, k.detach().double(), cos.double(), sin.double())[0].sum().backward()
    torch.testing.assert_close(q.grad.double(), qd.grad)
    assert k.grad is None or torch.equal(k.grad, torch.zeros_like(k))


def test_bad_input_names_the_argument():
    q = torch.randn(1, 2, 5, 8, device=DEVICE)
    cos = torch.randn(1, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim must be even"):
        rotary(q[..., :7], q[..., :7], cos[..., :7], cos[..., :7])
    with pytest.raises(ValueError, match="k must be"):
        rotary(q, q[:, :, :4], cos, cos)
    with pytest.raises(ValueError, match="cos must be"):
        rotary(q, q, cos[:, :4], cos)
    with pytest.raises(ValueError, match="sin must have cos's shape"):
        q2 = torch.randn(2, 2, 5, 8, device=DEVICE)
        rotary(q2, q2, cos, torch.randn(2, 5, 8, device=DEVICE))
    with pytest.raises(TypeError, match="k must have q's dtype"):
        rotary(q, q.half(), cos, cos)
    with pytest.raises(ValueError, match="q must be"):
        rotary(q[0], q[0], cos, cos)
    with pytest.raises(ValueError, match="must not require grad"):
        rotary(q, q, cos.requires_grad_(), cos)
    with pytest.raises(ValueError, match="q is on meta"):
        m = torch.empty(1, 2, 5, 8, device="meta")
        rotary(m, m, torch.empty(1, 5, 8, device="meta"), torch.empty(1, 5, 8, device="meta"))


def test_supports_gives_the_reason_or_none():
    q = torch.empty(1, 2, 5, 8, device="meta")
    c = torch.empty(1, 5, 8, device="meta")
    assert SUPPORTS["rotary"](q, q, c, c) is None
    assert "float64" in SUPPORTS["rotary"](q.double(), q.double(), c, c)
    big = torch.empty(1, 1, 2, 1024, device="meta")
    assert "head_dim" in SUPPORTS["rotary"](big, big, c, c)
