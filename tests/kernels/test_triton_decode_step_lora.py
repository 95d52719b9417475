"""Unmerged LoRA updates inside the Triton fused decode step (interpreter on CPU): one active
adapter, a mixed batch with a row on the base, a switch seen through the same tables, and
tables that no longer fit."""

import copy

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.adapters import LoraConfig, add_lora, mixed_batch, set_adapter  # noqa: E402
from ryzen_opt.kernels.triton import decode_step as tds  # noqa: E402
from ryzen_opt.models import ModelConfig, SimpleTransformerModel  # noqa: E402
from ryzen_opt.optimization.fastpaths import param_slots  # noqa: E402
from ryzen_opt.optimization.fastpaths.lora import DeviceLoraTables  # noqa: E402
from ryzen_opt.optimization.kvcache import KVBuffer  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TARGETS = ("qkv", "proj", "fc1", "fc2")


def _model(targets=TARGETS, ff_dim=40):
    torch.manual_seed(7)
    cfg = ModelConfig(vocab_size=50, embedding_dim=24, num_heads=3, num_layers=2, ff_dim=ff_dim)
    m = SimpleTransformerModel(cfg).eval()
    for i, name in enumerate(("a", "b")):
        add_lora(m, LoraConfig(rank=4 + 4 * i, alpha=8, target_modules=targets), name)
    with torch.no_grad():  # non-zero B and biases, so a skipped or misplaced update shows
        for n, p in m.named_parameters():
            p.add_(0.2 * torch.randn_like(p) if "lora_B" in n else 0.05 * torch.randn_like(p))
    return m


def _step(model, ref, ids, prompt, tables):
    """Logits of the fused step at ``prompt`` (cache from ``ref``'s prefill) and ``ref``'s."""
    cfg = model.config
    b = ids.shape[0]
    with torch.no_grad():
        _, cache = ref(ids[:, :prompt])
        want, _ = ref(ids[:, prompt : prompt + 1], cache)
    buf = KVBuffer(
        cfg.num_layers, b, cfg.num_heads, cfg.max_seq_len, cfg.head_dim, torch.device(DEVICE),
        torch.float32,
    )  # fmt: skip
    buf.load([(k.to(DEVICE, torch.float32), v.to(DEVICE, torch.float32)) for k, v in cache], prompt)
    params = {n: getattr(mod, attr).detach() for n, mod, attr in param_slots(model)}
    ws = tds.Workspace(b, cfg.embedding_dim, cfg.ff_dim, cfg.vocab_size, DEVICE, torch.float32)
    pos = torch.full((1,), prompt, dtype=torch.int64, device=DEVICE)
    tok = ids[:, prompt].to(DEVICE).contiguous()
    got = tds.decode_step(
        params, tok, pos, buf.k, buf.v, ws, heads=cfg.num_heads, eps=model.ln_f.eps,
        lora=tables.slots,
    )  # fmt: skip
    return got.cpu(), want[:, 0]


@pytest.mark.parametrize(
    "targets, ff_dim",
    [
        (TARGETS, 40),
        (("fc1",), 40),
        (("qkv", "fc2"), 40),
        # fc2 reads 600 features: rank rows go 4 at a time, adapter b's 8 in two chunks
        (("fc2",), 600),
    ],
)
def test_an_active_adapter_is_added_inside_the_step(targets, ff_dim):
    model = _model(targets, ff_dim).to(DEVICE)
    ref = copy.deepcopy(model).cpu().double()
    ids = torch.randint(0, 50, (3, 7))
    tables = DeviceLoraTables(model, 3)
    for name in ("b", "a", None):  # switching rewrites the same tables
        set_adapter(model, name)
        set_adapter(ref, name)
        assert tables.sync()
        got, want = _step(model, ref, ids, 6, tables)
        assert_close_rel(got, want, TOL[torch.float32], f"adapter {name}")
    assert len(tables.slots) == 2 * len(targets)


def test_a_mixed_batch_gives_each_row_its_adapter():
    model = _model().to(DEVICE)
    ref = copy.deepcopy(model).cpu().double()
    ids = torch.randint(0, 50, (3, 7))
    rows = ["b", None, "a"]
    tables = DeviceLoraTables(model, 3)
    with mixed_batch(model, rows), mixed_batch(ref, rows):
        assert tables.sync()
        got, want = _step(model, ref, ids, 6, tables)
    assert_close_rel(got, want, TOL[torch.float32], "mixed batch")
    for r, name in enumerate(rows):  # each row is its own adapter's step, alone
        alone = copy.deepcopy(ref)
        set_adapter(alone, name)
        with torch.no_grad():
            _, cache = alone(ids[r : r + 1, :6])
            one, _ = alone(ids[r : r + 1, 6:7], cache)
        assert_close_rel(got[r : r + 1], one[:, 0], TOL[torch.float32], f"row {r}")
    assert tables.sync()  # the mixed batch ended: no row adds an update now
    assert all(bool((s.rows == -1).all()) for s in tables.slots.values())


def test_tables_that_no_longer_fit_say_so():
    model = _model().to(DEVICE)
    tables = DeviceLoraTables(model, 2)
    assert (tables.adapters, tables.max_rank) == (2, 8)
    add_lora(model, LoraConfig(rank=16, alpha=8, target_modules=TARGETS), "c")
    set_adapter(model, "c")
    assert not tables.fits()
    assert not tables.sync()
    assert DeviceLoraTables(model, 2).sync()


def test_bad_tables_are_named():
    model = _model().to(DEVICE)
    tables = DeviceLoraTables(model, 3)
    cfg = model.config
    slot = tables.slots[(0, "mlp.fc1")]
    ws = tds.Workspace(2, cfg.embedding_dim, cfg.ff_dim, cfg.vocab_size, DEVICE, torch.float32)
    params = {n: getattr(mod, attr).detach() for n, mod, attr in param_slots(model)}
    buf = KVBuffer(2, 2, 3, cfg.max_seq_len, 8, torch.device(DEVICE), torch.float32)
    pos = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    tok = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"rows must be \(2,\) int32"):  # tables for batch 3
        tds.decode_step(params, tok, pos, buf.k, buf.v, ws, heads=3, eps=1e-5,
                        lora={(0, "mlp.fc1"): slot})  # fmt: skip
    with pytest.raises(ValueError, match="unknown linear"):
        tds.decode_step(params, tok, pos, buf.k, buf.v, ws, heads=3, eps=1e-5,
                        lora={(0, "mlp.fc9"): slot})  # fmt: skip
    with pytest.raises(ValueError, match=r"a must be \(adapters, rank, 40\)"):
        tds.decode_step(params, tok, pos, buf.k, buf.v, ws, heads=3, eps=1e-5,
                        lora={(1, "mlp.fc2"): slot})  # fmt: skip
