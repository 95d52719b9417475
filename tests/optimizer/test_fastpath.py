"""Model-level fast paths: the fused Numba decode step, the static KV cache, routing."""

import copy

import pytest
import torch

from ryzen_opt import OptimizeConfig, optimize
from ryzen_opt.models import ModelConfig, SimpleTransformerModel
from ryzen_opt.optimization.fastpaths import (
    FastPaths,
    FastPathTransformer,
    NumbaFusedDecode,
    install,
    structure_reason,
)
from ryzen_opt.optimization.kvcache import StaticKVCache
from tests.optimizer.fakes import fast_config, one_thread, tiny_model


def _model(tie=True, **kw):
    cfg = dict(
        vocab_size=97, embedding_dim=40, num_heads=5, num_layers=2, ff_dim=70, max_seq_len=24
    )
    cfg.update(kw)
    torch.manual_seed(3)
    m = SimpleTransformerModel(ModelConfig(tie_weights=tie, **cfg)).eval()
    with torch.no_grad():  # non-zero biases and norms, so a wrong offset shows
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["serial", "pool"])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("tie", [True, False])
def test_fused_step_matches_two_model_steps(mode, batch, tie):
    model, ref = _model(tie), _model(tie)
    path = NumbaFusedDecode(mode)
    assert path.why_not(model) is None
    ids = torch.randint(0, 97, (batch, 9))
    with torch.no_grad():
        _, cache = ref(ids[:, :7])
        want1, c1 = ref(ids[:, 7:8], cache)
        want2, _ = ref(ids[:, 8:9], c1)
        got1, s1 = path(model, ids[:, 7:8], cache, 7)
        got2, s2 = path(model, ids[:, 8:9], s1, 8)
    assert isinstance(s2, StaticKVCache) and s2.length == 9
    assert _rel(got1, want1) < 1e-5 and _rel(got2, want2) < 1e-5
    # The static cache holds what the tuple cache holds.
    with torch.no_grad():
        _, full = ref(ids)
    for i in range(2):
        torch.testing.assert_close(s2[i][0], full[i][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s2[i][1], full[i][1], rtol=1e-5, atol=1e-6)


def test_arena_keeps_state_dict_and_tracks_weight_changes():
    model, ref = _model(), _model()
    keys = list(model.state_dict())
    path = NumbaFusedDecode("serial")
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        _, cache = ref(ids[:, :4])
        path(model, ids[:, 4:], cache, 4)
    assert list(model.state_dict()) == keys
    assert model.head.weight is model.tok_emb.weight  # still tied
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    # New weights loaded in place are used by the next step.
    other = _model(vocab_size=97)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        _, c2 = other(ids[:, :4])
        want, _ = other(ids[:, 4:], c2)
        got, _ = path(model, ids[:, 4:], c2, 4)
    assert _rel(got, want) < 1e-5
    # A replaced Parameter object is noticed and the arena rebuilt.
    model.ln_f.weight = torch.nn.Parameter(torch.full_like(model.ln_f.weight, 2.0))
    ref2 = copy.deepcopy(model.__class__(model.config))
    ref2.load_state_dict(model.state_dict())
    ref2.eval()
    with torch.no_grad():
        want, _ = ref2(ids[:, 4:], c2)
        got, _ = path(model, ids[:, 4:], c2, 4)
    assert _rel(got, want) < 1e-5


def test_branching_from_one_cache_never_corrupts_the_other_branch():
    model, ref = _model(), _model()
    path = NumbaFusedDecode("serial")
    ids = torch.randint(0, 97, (1, 4))
    with torch.no_grad():
        _, cache = ref(ids)
        static = path.adopt(model, cache)
        a_logits, a = path(model, torch.tensor([[1]]), static, 4)
        b_logits, b = path(model, torch.tensor([[2]]), static, 4)  # same parent, other token
        # Branch a must still hold token 1's keys at position 4.
        want_a, _ = ref(torch.tensor([[5]]), ref(torch.tensor([[1]]), cache)[1])
        got_a, _ = path(model, torch.tensor([[5]]), a, 5)
    assert a.buffer is not b.buffer
    assert _rel(got_a, want_a) < 1e-5
    assert not torch.equal(a_logits, b_logits)


def test_static_cache_reads_like_the_tuple_cache_and_validates():
    tup = tuple((torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)) for _ in range(2))
    c = StaticKVCache.from_cache(tup, max_len=8)
    assert len(c) == 2 and c.batch == 2 and c.length == 5
    for (k, v), (k2, v2) in zip(c, tup, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    assert c[:1][0][0].shape == (2, 3, 5, 4)
    assert c.writable()
    longer = c.advanced()
    assert not c.writable() and longer.writable()
    del longer
    assert c.writable()
    with pytest.raises(ValueError, match="max_len"):
        StaticKVCache.from_cache(tup, max_len=4)
    with pytest.raises(ValueError, match="length"):
        StaticKVCache(c.buffer, 9)


def test_structure_reason_names_what_is_not_served():
    m = tiny_model()
    assert structure_reason(m) is None
    assert "not a SimpleTransformerModel" in structure_reason(torch.nn.Linear(2, 2))
    m.blocks[0].mlp = torch.nn.Sequential(torch.nn.Linear(32, 32))
    assert "mlp" in structure_reason(m)
    assert "float32" in NumbaFusedDecode("serial").why_not(_model().to(torch.float64))
    with pytest.raises(ValueError, match="mode"):
        NumbaFusedDecode("threads")


def test_optimize_keeps_a_faster_fused_decode_and_generates_the_same_tokens(tmp_path):
    model = _model()
    cfg = fast_config(
        tmp_path, backends=(), fast_paths=("numba_fused_decode[serial]",), model_check=True
    )
    fast = optimize(model, config=cfg)
    rep = fast.optimization_report
    site = next(s for s in rep.sites if s.kind == "decode step")
    res = [c for r in site.cases for c in r.candidates]
    assert all(c.status in ("faster", "slower") for c in res), [c.detail for c in res]
    assert all(c.rel_error is not None and c.rel_error < 1e-4 for c in res)
    if site.chosen:  # faster on this machine: routed and exact
        assert isinstance(fast, FastPathTransformer)
        assert isinstance(fast, SimpleTransformerModel)
        assert "fast paths" in " ".join(rep.notes)
    else:
        assert type(fast) is SimpleTransformerModel
    assert type(model) is SimpleTransformerModel  # the original is untouched
    x = torch.randint(0, 97, (2, 3))
    assert torch.equal(fast.generate(x, 12), model.generate(x, 12))
    # state_dict round trip in both directions
    back = SimpleTransformerModel(model.config)
    back.load_state_dict(fast.state_dict())
    fast.load_state_dict(model.state_dict())
    assert rep.to_json() and rep.to_markdown()


def test_installed_paths_route_only_served_calls():
    model, ref = _model(), _model()
    path = NumbaFusedDecode("serial")
    calls = []

    def counting(m, idx, cache, past):
        calls.append(idx.shape[0])
        return path(m, idx, cache, past)

    counting.name, counting.kind = path.name, "decode"
    undo = install(model, FastPaths([(1, 2, counting)]))
    assert isinstance(model, FastPathTransformer)
    x = torch.randint(0, 97, (3, 4))
    with torch.no_grad():
        model(x[:2, :3], ref(x[:2, :3])[1])  # a chunk after a cache: not routed
        model.generate(x[:2], 3)  # batch 2 decode: routed
        model.generate(x, 3)  # batch 3: outside the measured range
        model.train()
        model(x[:1, :1], ref(x[:1, :2])[1])  # training mode: not routed
        model.eval()
    assert calls == [2, 2]
    with torch.enable_grad():
        _, cache = model(x[:1, :2])
        model(x[:1, 2:3], cache)  # autograd on: not routed
    assert calls == [2, 2]
    assert torch.equal(model.generate(x[:2], 5), ref.generate(x[:2], 5))
    undo()
    assert type(model) is SimpleTransformerModel and "_fast_paths" not in model.__dict__


class _Shifted(torch.nn.Module):
    """A linear with a fixed update added, standing in for a LoRA layer wrapped in later."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base
        self.delta = torch.nn.Parameter(torch.full((base.out_features,), 0.5))

    def forward(self, x):
        return self.base(x) + self.delta


def test_a_module_swapped_in_after_install_runs_the_model_code():
    model, ref = _model(), _model()
    install(model, FastPaths([(1, 4, NumbaFusedDecode("serial"))]))
    x = torch.randint(0, 97, (2, 4))
    assert torch.equal(model.generate(x, 6), ref.generate(x, 6))
    for m in (model, ref):
        m.blocks[1].mlp.fc1 = _Shifted(m.blocks[1].mlp.fc1)
        with torch.no_grad():
            m.blocks[1].mlp.fc1.base.weight.mul_(2.0)  # the arena's values change too
    with pytest.warns(UserWarning, match="modules changed"):
        out = model.generate(x, 6)
    assert torch.equal(out, ref.generate(x, 6))
    with torch.no_grad():
        _, cache = ref(x)
        want, _ = ref(x[:, :1], cache)
        got, _ = model(x[:, :1], cache)
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["serial", "pool"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generate_runs_the_whole_loop_in_one_call(mode, batch):
    model, ref = _model(), _model()
    per_token, loops = [], []

    class Spy(NumbaFusedDecode):
        def __call__(self, *args):
            per_token.append(1)
            return super().__call__(*args)

        def greedy(self, *args, **kw):
            loops.append(args[-1])
            return super().greedy(*args, **kw)

    install(model, FastPaths([(1, 4, Spy(mode))]))
    x = torch.randint(0, 97, (batch, 4))
    want = ref.generate(x, 12)
    assert torch.equal(model.generate(x, 12), want)
    assert loops == [11] and per_token == []
    assert torch.equal(model.generate(x.int(), 5), ref.generate(x.int(), 5))
    # eos_id: rows that produced it repeat it; generation stops once every row has (with one
    # row, at eos; when the first token already is eos, after it).
    for eos in (int(want[0, 6]), int(want[0, 4])):
        got, exp = model.generate(x, 12, eos_id=eos), ref.generate(x, 12, eos_id=eos)
        assert torch.equal(got, exp), eos
    if batch == 1:
        assert got.shape[1] == 5 and exp.shape[1] == 5
    assert per_token == []
    # Sampling runs generate's per-token loop over the same fast step.
    kw = dict(temperature=0.8, seed=1)
    assert torch.equal(model.generate(x, 6, **kw), ref.generate(x, 6, **kw))
    assert per_token
    # Training mode generates in eval mode and is restored, like the model's generate.
    model.train()
    assert torch.equal(model.generate(x, 4), ref.generate(x, 4))
    assert model.training
    # Bad input gets generate's own errors.
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(x, -1)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(x, 100)
    with pytest.raises(TypeError, match="idx"):
        model.generate(x.float(), 3)
    with pytest.raises(ValueError, match="eos_id"):
        model.generate(x, 3, eos_id=97)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(x, 3, top_k=0)
    with pytest.raises(TypeError, match="seed"):
        model.generate(x, 3, seed="abc")  # greedy ignores the seed but still checks it
    assert torch.equal(model.generate(x, 0), x)


def test_greedy_generate_falls_back_when_the_path_declines():
    model, ref = _model(), _model()

    class Busy(NumbaFusedDecode):
        def greedy(self, *args, **kw):
            return None  # e.g. a CUDA graph whose static buffer holds another generation

    install(model, FastPaths([(1, 4, Busy("serial"))]))
    x = torch.randint(0, 97, (2, 4))
    assert torch.equal(model.generate(x, 9), ref.generate(x, 9))


def test_deepcopy_of_a_fast_model_rebuilds_its_arena():
    model, ref = _model(), _model()
    install(model, FastPaths([(1, 4, NumbaFusedDecode("serial"))]))
    x = torch.randint(0, 97, (1, 3))
    model.generate(x, 2)  # builds the arena
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        for p in ref.parameters():
            p.mul_(0.5)
    assert torch.equal(twin.generate(x, 6), ref.generate(x, 6))
    assert not torch.equal(model.tok_emb.weight, twin.tok_emb.weight)


def test_fast_paths_config_validates():
    with pytest.raises(ValueError, match="fast_paths"):
        OptimizeConfig(fast_paths=("warp_drive",))
    with pytest.raises(ValueError, match="fast_paths"):
        OptimizeConfig(fast_paths="cuda_graph_decode")
    assert OptimizeConfig(fast_paths=()).to_dict()["fast_paths"] == []


def test_one_thread_pool_mode_runs_serially():
    model, ref = _model(), _model()
    ids = torch.randint(0, 97, (4, 6))
    with one_thread(), torch.no_grad():
        _, cache = ref(ids[:, :5])
        want, _ = ref(ids[:, 5:], cache)
        got, _ = NumbaFusedDecode("pool")(model, ids[:, 5:], cache, 5)
        assert torch.get_num_threads() == 1
    assert _rel(got, want) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["cuda_graph_decode", "triton_graph_decode"])
@pytest.mark.parametrize("batch", [1, 5])
def test_cuda_graph_paths_match_the_model(batch, decode):
    from ryzen_opt.optimization.fastpaths import CudaGraphPrefill, make_path

    model, ref = _model().cuda(), _model().cuda()
    dec, pre = make_path(decode), CudaGraphPrefill()
    assert dec.why_not(model) is None and pre.why_not(model) is None
    ids = torch.randint(0, 97, (batch, 12), device="cuda")
    with torch.no_grad():
        want_p, cache = ref(ids[:, :10])
        got_p, gcache = pre(model, ids[:, :10], None, 0)
        assert _rel(got_p, want_p) < 1e-5
        for (k, v), (k2, v2) in zip(gcache, cache, strict=True):
            torch.testing.assert_close(k, k2)
            torch.testing.assert_close(v, v2)
        want1, c1 = ref(ids[:, 10:11], cache)
        want2, _ = ref(ids[:, 11:12], c1)
        got1, s1 = dec(model, ids[:, 10:11], cache, 10)
        got2, s2 = dec(model, ids[:, 11:12], s1, 11)
    assert _rel(got1, want1) < 1e-5 and _rel(got2, want2) < 1e-5
    # The returned logits are copies: the next replay does not change them.
    assert not torch.equal(got1, got2)
    # Every later position too (one capture serves them all; a stale mask or position shows).
    with torch.no_grad():
        _, c = ref(ids, None)
        cache = s2
        for p in range(12, model.config.max_seq_len):
            nxt = torch.randint(0, 97, (batch, 1), device="cuda")
            want, c = ref(nxt, c)
            got, cache = dec(model, nxt, cache, p)
            assert _rel(got, want) < 1e-5, f"position {p}"
    fast = optimize(
        model,
        config=OptimizeConfig(use_cache=False, repeat=5, warmup=1, fast_paths=(decode,)),
    )
    x = torch.randint(0, 97, (2, 3), device="cuda")
    assert torch.equal(fast.generate(x, 12), ref.generate(x, 12))
