"""Triton split-K decode attention against the float64 reference."""

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels import reference  # noqa: E402
from ryzen_opt.kernels.triton import decode_attention as td  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison():
    # torch.empty fills NaN in deterministic mode: unwritten outputs fail assert_close_rel.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _ref(q, kc, vc, lengths, scale=None):
    d = lambda t: t.detach().double().cpu()
    return reference.decode_attention(d(q), d(kc), d(vc), lengths.cpu(), scale)


def _inputs(b, hq, hkv, max_len, d, dtype):
    q = torch.randn(b, hq, d, device=DEVICE, dtype=dtype)
    kc = torch.randn(b, hkv, max_len, d, device=DEVICE, dtype=dtype)
    vc = torch.randn(b, hkv, max_len, d, device=DEVICE, dtype=dtype)
    return q, kc, vc


@pytest.mark.parametrize(
    "b,hq,hkv,max_len,d,lengths",
    [
        (3, 4, 2, 113, 64, [0, 1, 113]),  # an empty row, a one-key row, a full row
        (2, 8, 1, 600, 32, [300, 599]),  # several splits, MQA, lengths mid-chunk
        (1, 2, 2, 17, 48, [17]),  # head_dim not a power of two
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_reference(b, hq, hkv, max_len, d, lengths, dtype):
    q, kc, vc = _inputs(b, hq, hkv, max_len, d, dtype)
    lens = torch.tensor(lengths, device=DEVICE)
    out = td.decode_attention(q, kc, vc, lens)
    assert_close_rel(out, _ref(q, kc, vc, lens), TOL[dtype], f"{b, hq, hkv, max_len, d}")
    if 0 in lengths:
        assert (out[lengths.index(0)] == 0).all()


def test_decode_splits_the_cache_when_rows_are_few():
    splits, chunk = td._plan_splits(rows=2, max_len=600, sms=4)
    assert splits > 1 and splits * chunk >= 600 and (splits - 1) * chunk < 600


def test_decode_strided_cache_view_and_scale():
    # A cache preallocated for 300 positions, of which the first 130 are passed in.
    b, hq, hkv, d = 2, 4, 2, 64
    kbuf = torch.randn(b, hkv, 300, d, device=DEVICE, dtype=torch.float16)
    vbuf = torch.randn(b, hkv, 300, d, device=DEVICE, dtype=torch.float16)
    kc, vc = kbuf[:, :, :130], vbuf[:, :, :130]
    q = torch.randn(b, hq, d, device=DEVICE, dtype=torch.float16)
    lens = torch.tensor([130, 77], device=DEVICE, dtype=torch.int32)
    out = td.decode_attention(q, kc, vc, lens, scale=0.2)
    assert_close_rel(out, _ref(q, kc, vc, lens, 0.2), TOL[torch.float16])


def test_decode_rejects_bad_input_naming_the_argument():
    q, kc, vc = _inputs(2, 4, 2, 16, 32, torch.float32)
    # The range check reads the lengths on the host, so only CPU lengths get it (on CUDA
    # it would cost a sync per decode step; the kernel clamps instead).
    with pytest.raises(ValueError, match="cache_lengths must lie"):
        td.decode_attention(q.cpu(), kc.cpu(), vc.cpu(), torch.tensor([3, 17]))
    with pytest.raises(ValueError, match="cache_lengths must be"):
        td.decode_attention(q, kc, vc, torch.tensor([3.0, 1.0], device=DEVICE))
    with pytest.raises(TypeError, match="share a dtype"):
        td.decode_attention(q, kc.half(), vc, torch.tensor([3, 1], device=DEVICE))
    big = torch.randn(1, 1, 512, device=DEVICE)
    cache = torch.randn(1, 1, 4, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim is 512"):
        td.decode_attention(big, cache, cache, torch.tensor([4], device=DEVICE))


@pytest.mark.gpu
def test_decode_rejects_cpu_tensors_on_a_gpu_machine():
    q, kc = torch.randn(1, 2, 32), torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="q is on cpu"):
        td.decode_attention(q, kc, kc, torch.tensor([8]))


@pytest.mark.gpu
@pytest.mark.parametrize("b,max_len", [(8, 4096), (16, 32768), (64, 4097)])
def test_decode_gpu_sizes_match_reference(b, max_len):
    q, kc, vc = _inputs(b, 32, 8, max_len, 128, torch.bfloat16)
    lens = torch.randint(0, max_len + 1, (b,), device=DEVICE)
    lens[0] = max_len
    out = td.decode_attention(q, kc, vc, lens)
    ref = reference.decode_attention(q.double(), kc.double(), vc.double(), lens)
    assert_close_rel(out, ref, TOL[torch.bfloat16], f"b={b} max_len={max_len}")
