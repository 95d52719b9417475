"""The Triton ops are torch.library custom ops: torch.compile traces them as single nodes."""

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels.triton import attention as ta  # noqa: E402
from ryzen_opt.kernels.triton import decode_attention as td  # noqa: E402
from ryzen_opt.kernels.triton import layer_norm as tln  # noqa: E402
from ryzen_opt.kernels.triton import matmul as tm  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402


def test_custom_ops_are_registered_with_fake_kernels():
    for name in (
        "triton_matmul",
        "triton_attention",
        "triton_decode_attention",
        "triton_layer_norm",
        "triton_add_layer_norm",
    ):
        assert hasattr(torch.ops.ryzen_opt, name)
    a = torch.empty(2, 5, 7, device="meta", dtype=torch.bfloat16)
    b = torch.empty(7, 3, device="meta", dtype=torch.bfloat16)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fa, fb = mode.from_tensor(a), mode.from_tensor(b)
        out = torch.ops.ryzen_opt.triton_matmul(fa, fb, None, "gelu", None, torch.float32)
        assert out.shape == (2, 5, 3) and out.dtype == torch.float32


class _Block(torch.nn.Module):
    """A pre-LN transformer block built only from the Triton launchers."""

    def __init__(self, dim=256, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        mk = lambda *s: torch.nn.Parameter(torch.randn(*s) * 0.05)
        self.ln_w, self.ln_b = mk(dim), mk(dim)
        self.wq, self.wkv = mk(dim, dim), mk(dim, 2 * kv_heads * self.hd)
        self.wo, self.w1, self.b1, self.w2 = (
            mk(dim, dim),
            mk(dim, 4 * dim),
            mk(4 * dim),
            mk(4 * dim, dim),
        )

    def forward(self, x, r):
        b, s, dim = x.shape
        y, h = tln.layer_norm(x, self.ln_w, self.ln_b, residual=r)
        q = tm.matmul(y, self.wq).view(b, s, self.heads, self.hd).transpose(1, 2)
        kv = tm.matmul(y, self.wkv).view(b, s, 2, self.kv_heads, self.hd)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        a = ta.attention(q, k, v, causal=True).transpose(1, 2).reshape(b, s, dim)
        h = tm.matmul(a, self.wo, residual=h)
        y = tln.layer_norm(h, self.ln_w, self.ln_b)
        return tm.matmul(
            tm.matmul(y, self.w1, bias=self.b1, activation="gelu"), self.w2, residual=h
        )


@pytest.mark.gpu
def test_model_of_triton_ops_runs_under_torch_compile():
    torch.manual_seed(0)
    block = _Block().cuda().to(torch.bfloat16)
    x = torch.randn(2, 100, 256, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    # The ops are forward-only (inference): no autograd formula is registered.
    with torch.no_grad():
        eager = block(x, r)
        compiled = torch.compile(block)(x, r)
    assert_close_rel(compiled, eager, TOL[torch.bfloat16], "compiled vs eager")


@pytest.mark.gpu
def test_custom_ops_compile_in_one_graph():
    q = torch.randn(2, 4, 64, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([300, 17], device="cuda")

    def step(q, kc, lens):
        o = torch.ops.ryzen_opt.triton_decode_attention(q, kc, kc, lens, None)
        return torch.ops.ryzen_opt.triton_layer_norm(o, None, None, 1e-5)

    compiled = torch.compile(step, fullgraph=True)
    assert_close_rel(compiled(q, kc, lens), step(q, kc, lens), TOL[torch.bfloat16])
    assert td.decode_attention(q, kc, kc, lens).shape == q.shape
