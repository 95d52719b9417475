"""Triton flash attention against the float64 reference (interpreter on CPU, GPU kernels)."""

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels import BackendError, reference  # noqa: E402
from ryzen_opt.kernels import attention as public_attention  # noqa: E402
from ryzen_opt.kernels.triton import attention as ta  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison():
    # torch.empty fills NaN in deterministic mode: unwritten outputs fail assert_close_rel.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    # fp32 attention is checked at the fp32 tolerance: no TF32 in its dots.
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _ref(q, k, v, causal=False, scale=None):
    d = lambda t: t.detach().double().cpu()
    return reference.attention(d(q), d(k), d(v), causal=causal, scale=scale)


def _qkv(b, hq, hkv, lq, lk, d, dtype):
    mk = lambda h, n: torch.randn(b, h, n, d, device=DEVICE, dtype=dtype)
    return mk(hq, lq), mk(hkv, lk), mk(hkv, lk)


CASES = [
    # (b, hq, hkv, lq, lk, d, causal)
    (1, 2, 2, 17, 17, 32, False),
    (2, 4, 2, 113, 255, 64, True),  # GQA, q_len < k_len: bottom-right diagonal
    (1, 4, 1, 1, 113, 64, True),  # a single query row (decode-like), MQA
    (1, 2, 2, 113, 33, 32, True),  # q_len > k_len: the first 80 rows see no key
    (2, 2, 1, 33, 255, 64, False),
    (1, 2, 2, 17, 40, 48, True),  # head_dim not a power of two
]


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,causal", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_matches_reference(b, hq, hkv, lq, lk, d, causal, dtype):
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype)
    out = ta.attention(q, k, v, causal=causal)
    tol = TOL[dtype]
    assert_close_rel(out, _ref(q, k, v, causal), tol, f"{(b, hq, hkv, lq, lk, d, causal)}")


@pytest.mark.parametrize("scale", [-0.4, 0.0, 0.3])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_any_sign_of_scale(scale, causal):
    # scale >= 0 takes the folded path on unmasked key tiles (max of raw scores, one FMA per
    # score); a negative scale, whose max is the raw scores' min, keeps the scale-first path.
    q, k, v = _qkv(1, 2, 1, 45, 77, 32, torch.float32)
    out = ta.attention(q, k, v, causal=causal, scale=scale)
    assert_close_rel(out, _ref(q, k, v, causal, scale), TOL[torch.float32], f"scale={scale}")


def test_attention_rows_that_see_no_key_are_zero():
    q, k, v = _qkv(1, 2, 2, 50, 10, 32, torch.float32)
    out = ta.attention(q, k, v, causal=True)
    assert (out[:, :, :40] == 0).all()


def test_attention_fp16_with_scale_and_strided_inputs():
    b, L, h, d = 2, 77, 4, 64
    # (batch, seq, heads, dim) projections viewed as (batch, heads, seq, dim), as models do.
    qkv = torch.randn(b, L, 3, h, d, device=DEVICE, dtype=torch.float16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out = ta.attention(q, k, v, causal=True, scale=0.3)
    assert_close_rel(out, _ref(q, k, v, True, 0.3), TOL[torch.float16])


def test_attention_empty_keys_give_zeros():
    q, k, v = _qkv(1, 2, 2, 5, 0, 32, torch.float32)
    out = ta.attention(q, k, v)
    assert out.shape == (1, 2, 5, 32) and (out == 0).all()


def test_attention_rejects_bad_input_naming_the_argument():
    q, k, v = _qkv(1, 2, 2, 8, 8, 32, torch.float32)
    with pytest.raises(TypeError, match="share a dtype"):
        ta.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="must divide"):
        ta.attention(torch.randn(1, 3, 8, 32, device=DEVICE), k, v)
    big = torch.randn(1, 1, 4, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim is 512"):
        ta.attention(big, big, big)
    mask = torch.ones(8, 8, dtype=torch.bool, device=DEVICE)
    assert "attn_mask" in ta.supports(q, k, v, attn_mask=mask)
    with pytest.raises(ValueError, match="attn_mask"):
        ta.attention(q, k, v, attn_mask=mask)
    with pytest.raises(BackendError, match="attn_mask"):
        public_attention(q, k, v, attn_mask=mask, backend="triton")
    meta = torch.empty(1, 2, 8, 32, device="meta")
    with pytest.raises(ValueError, match="q is on meta"):
        ta.attention(meta, meta, meta)


@pytest.mark.gpu
def test_attention_rejects_cpu_tensors_on_a_gpu_machine():
    x = torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="q is on cpu"):
        ta.attention(x, x, x)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "d,causal,lq,lk",
    [
        (64, False, 1024, 1024),
        (64, True, 1000, 3001),
        (128, True, 4096, 4096),  # above the autotuning threshold
        (128, False, 1000, 3001),
        (256, True, 1024, 1024),
        (64, True, 4096, 4096),
    ],
)
def test_attention_gpu_sizes_match_reference(d, causal, lq, lk):
    q, k, v = _qkv(1, 4, 2, lq, lk, d, torch.bfloat16)
    out = ta.attention(q, k, v, causal=causal)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    assert_close_rel(out, ref, TOL[torch.bfloat16], f"d={d} causal={causal} {lq}x{lk}")
