"""Triton fused decode step against the model's own float64 forward (interpreter on CPU)."""

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels.triton import decode_step as tds  # noqa: E402
from ryzen_opt.models import ModelConfig, SimpleTransformerModel  # noqa: E402
from ryzen_opt.optimization.fastpaths import param_slots as _param_slots  # noqa: E402
from ryzen_opt.optimization.kvcache import KVBuffer  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(tie, **kw):
    cfg = dict(vocab_size=50, embedding_dim=24, num_heads=3, num_layers=2, ff_dim=40)
    cfg.update(kw)
    torch.manual_seed(5)
    m = SimpleTransformerModel(ModelConfig(tie_weights=tie, **cfg)).eval()
    with torch.no_grad():  # non-zero biases and norms, so a swapped parameter shows
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize(
    "batch, prompt, max_seq_len, tie, rows_per_program, dtype",
    [
        (1, 5, 16, True, 4, torch.float32),
        (3, 7, 16, False, 2, torch.float32),  # the second row group is partial
        (3, 7, 16, True, 1, torch.float32),
        # 70 positions: attention runs over two key tiles (64 keys each), the second partial.
        (2, 66, 70, True, 4, torch.float32),
        # Half-precision weights and cache, fp32 math: against the same weights in float64.
        (2, 7, 16, False, 1, torch.bfloat16),
        (2, 7, 16, True, 1, torch.float16),
    ],
)
def test_two_steps_match_the_model(batch, prompt, max_seq_len, tie, rows_per_program, dtype):
    model = _model(tie, max_seq_len=max_seq_len).to(dtype)
    ref = _model(tie, max_seq_len=max_seq_len).to(dtype).double()
    model = model.to(DEVICE)
    tol = TOL[dtype]
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt + 2))
    with torch.no_grad():
        _, cache = ref(ids[:, :prompt])
        want1, c1 = ref(ids[:, prompt : prompt + 1], cache)
        want2, c2 = ref(ids[:, prompt + 1 :], c1)
    buf = KVBuffer(
        cfg.num_layers,
        batch,
        cfg.num_heads,
        max_seq_len,
        cfg.head_dim,
        torch.device(DEVICE),
        dtype,
    )
    buf.load([(k.to(DEVICE, dtype), v.to(DEVICE, dtype)) for k, v in cache], prompt)
    params = {name: getattr(mod, attr).detach() for name, mod, attr in _param_slots(model)}
    ws = tds.Workspace(batch, cfg.embedding_dim, cfg.ff_dim, cfg.vocab_size, DEVICE, dtype)
    pos = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    for step, want in enumerate((want1, want2)):
        pos.fill_(prompt + step)
        tok = ids[:, prompt + step].to(DEVICE).contiguous()
        out = tds.decode_step(
            params,
            tok,
            pos,
            buf.k,
            buf.v,
            ws,
            heads=cfg.num_heads,
            eps=model.ln_f.eps,
            rows_per_program=rows_per_program,
        )
        assert out is ws.logits
        assert_close_rel(out, want[:, 0], tol, f"step {step}")
    # The cache holds what the model's tuple cache holds, positions 0..prompt+1.
    n = prompt + 2
    for i, (k, v) in enumerate(c2):
        assert_close_rel(buf.k[i, :, :, :n], k, tol, f"k of layer {i}")
        assert_close_rel(buf.v[i, :, :, :n], v, tol, f"v of layer {i}")
    assert torch.count_nonzero(buf.k[:, :, :, n:]) == 0  # nothing written past the position


def test_supports_names_the_limit():
    dev = torch.device(DEVICE)
    assert tds.supports(256, 512, 4, dev) is None
    assert "4096" in tds.supports(256, 8192, 4, dev)
    assert "num_heads" in tds.supports(250, 512, 4, dev)


def test_rows_per_program_must_be_positive():
    ws = tds.Workspace(1, 8, 8, 8, DEVICE, torch.float32)
    with pytest.raises(ValueError, match="rows_per_program"):
        tds.decode_step({}, None, None, None, None, ws, heads=1, eps=1e-5, rows_per_program=0)
