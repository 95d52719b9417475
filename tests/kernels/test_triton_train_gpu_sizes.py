"""The training ops at model sizes on the GPU (compiled kernels, the GPU tile shapes, the
float32 accumulation of the LM-head weight gradient), against float64 autograd."""

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels import reference  # noqa: E402
from ryzen_opt.kernels.triton import training as T  # noqa: E402
from tests.kernels.train_check import check_fwd_bwd, leaf  # noqa: E402

BF16 = torch.bfloat16
pytestmark = pytest.mark.gpu


def test_linear_cross_entropy_llama_head_in_chunks():
    # 4 chunks of 512 rows over a 32000-word vocabulary: cross-chunk weight-gradient sums.
    n, h, v = 2048, 1024, 32000
    hid, w = leaf(n, h, dtype=BF16), leaf(v, h, dtype=BF16, scale=h**-0.5 * 3)
    lab = torch.randint(0, v, (n,), device="cuda")
    lab[::7] = -100
    check_fwd_bwd(
        lambda a, b: T.linear_cross_entropy(a, b, lab, chunk_size=512),
        lambda a, b: reference.linear_cross_entropy(a, b, lab),
        [hid, w],
        lambda ts: ts,
        BF16,
        "lce",
        {"grad1": n},
    )


@pytest.mark.parametrize("n", [768, 2048, 8192])
def test_norms_at_model_widths(n):
    x, r, w, b = (
        leaf(4096, n, dtype=BF16),
        leaf(4096, n, dtype=BF16),
        leaf(n, dtype=BF16),
        leaf(n, dtype=BF16),
    )
    red = {"grad2": 4096, "grad3": 4096}
    check_fwd_bwd(
        lambda *a: T.rms_norm_residual(*a, 1e-6),
        lambda *a: reference.rms_norm_residual(*a, 1e-6),
        [x, r, w],
        lambda ts: ts,
        BF16,
        f"rms {n}",
        red,
    )
    check_fwd_bwd(
        lambda *a: T.layer_norm_residual(*a, 1e-5),
        lambda *a: reference.layer_norm_residual(*a, 1e-5),
        [x, r, w, b],
        lambda ts: ts,
        BF16,
        f"ln {n}",
        red,
    )


def test_activations_and_rotary_at_model_sizes():
    g, u = leaf(4096, 5632, dtype=BF16), leaf(4096, 5632, dtype=BF16)
    check_fwd_bwd(T.swiglu, reference.swiglu, [g, u], lambda ts: ts, BF16, "swiglu")
    x = leaf(4096, 8192, dtype=BF16, scale=3.0)
    check_fwd_bwd(
        lambda t: T.gelu(t, "tanh"),
        lambda t: reference.gelu(t, "tanh"),
        [x],
        lambda ts: ts,
        BF16,
        "gelu",
    )
    q, k = leaf(2, 32, 2048, 64, dtype=BF16), leaf(2, 4, 2048, 64, dtype=BF16)
    ang = torch.randn(1, 2048, 32, device="cuda")
    cos, sin = torch.cat((ang, ang), -1).cos().to(BF16), torch.cat((ang, ang), -1).sin().to(BF16)
    check_fwd_bwd(
        T.rotary,
        reference.rotary,
        [q, k],
        lambda ts: (*ts, cos.to(ts[0].dtype), sin.to(ts[0].dtype)),
        BF16,
        "rotary",
    )


@pytest.mark.parametrize("d", [64, 128])
def test_attention_at_model_sizes(d):
    q = leaf(1, 2048 // d, 1024, d, dtype=BF16)
    k, v = leaf(1, 4, 1024, d, dtype=BF16), leaf(1, 4, 1024, d, dtype=BF16)
    check_fwd_bwd(
        lambda *a: T.attention(*a, causal=True),
        lambda *a: reference.attention(*a, causal=True),
        [q, k, v],
        lambda ts: ts,
        BF16,
        f"attention d={d}",
        {"grad0": d, "grad1": 1024, "grad2": 1024},
    )
