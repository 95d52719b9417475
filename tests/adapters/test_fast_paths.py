"""LoRA adapters through the seed model's fused Numba decode step: unmerged (one active
adapter, or a mixed batch) inside the step, merged through the weights it reads, and paths
that do not add LoRA updates kept off while one is needed."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("numba")

from ryzen_opt import OptimizeConfig, optimize  # noqa: E402
from ryzen_opt.adapters import (  # noqa: E402
    LoraConfig,
    add_lora,
    merge_adapter,
    mixed_batch,
    set_adapter,
    unmerge_adapter,
)
from ryzen_opt.models import ModelConfig, SimpleTransformerModel  # noqa: E402
from ryzen_opt.optimization.fastpaths import FastPaths, NumbaFusedDecode, install  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402

TARGETS = ("qkv", "proj", "fc1", "fc2")


def _model(adapters=("a", "b"), targets=TARGETS):
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=97, embedding_dim=40, num_heads=5, num_layers=2, ff_dim=70)
    m = SimpleTransformerModel(cfg).eval()
    for i, name in enumerate(adapters):
        add_lora(m, LoraConfig(rank=4 + 4 * i, alpha=8, target_modules=targets), name)
    with torch.no_grad():  # non-zero B, so an update that is skipped shows
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return m


def _step_logits(model, ids):
    with torch.no_grad():
        _, cache = model(ids[:, :-1])
        logits, _ = model(ids[:, -1:], cache)
    return logits


@pytest.mark.parametrize("mode", ["serial", "pool"])
@pytest.mark.parametrize("targets", [TARGETS, ("fc1",)])
def test_an_active_unmerged_adapter_runs_inside_the_fused_step(mode, targets):
    model = _model(targets=targets)
    set_adapter(model, "b")
    ref = copy.deepcopy(model)
    path = NumbaFusedDecode(mode)
    install(model, FastPaths([(1, 4, path)]))
    ids = torch.randint(0, 97, (3, 6))
    with torch.no_grad():
        _, cache = ref(ids[:, :-1])
        want, _ = ref(ids[:, -1:], cache)
        got, _ = path(model, ids[:, -1:], cache, 5)
    assert_close_rel(got, want, TOL[torch.float32], "adapter b, fused step")
    assert torch.equal(model.generate(ids, 8), ref.generate(ids, 8))
    # the greedy loop ran in the fused step: its 7 tokens after the first are counted there
    assert model._fast_paths.decode_steps == {"fast": 7, "model": 0}
    set_adapter(model, None)  # switching is seen by the next call (no stale tables)
    set_adapter(ref, None)
    assert torch.equal(model.generate(ids, 8), ref.generate(ids, 8))
    base = SimpleTransformerModel(model.config).eval()
    base.load_state_dict(
        {k.replace(".base_layer", ""): v for k, v in ref.state_dict().items() if "lora_" not in k}
    )
    assert torch.equal(model.generate(ids, 8), base.generate(ids, 8))


def test_a_mixed_batch_gives_each_row_its_adapter():
    model = _model()
    plain = copy.deepcopy(model)  # the references run the model's own code
    path = NumbaFusedDecode("serial")
    install(model, FastPaths([(1, 4, path)]))
    ids = torch.randint(0, 97, (3, 6))
    rows = ["a", None, "b"]
    with mixed_batch(model, rows), torch.no_grad():
        _, cache = model(ids[:, :-1])
        got, _ = path(model, ids[:, -1:], cache, 5)
    for r, name in enumerate(rows):  # each row alone, eager, with its own adapter
        alone = copy.deepcopy(plain)
        set_adapter(alone, name)
        want = _step_logits(alone, ids[r : r + 1])
        assert_close_rel(got[r : r + 1], want, TOL[torch.float32], f"row {r} ({name})")


def test_paths_without_lora_updates_stay_off_while_one_is_needed():
    model, calls = _model(), []

    class Plain:  # a path that does not add LoRA updates itself (as the CUDA graph paths)
        name, kind = "plain", "decode"

        def __init__(self):
            self.inner = NumbaFusedDecode("serial")

        def __call__(self, m, idx, cache, past):
            calls.append(1)
            return self.inner(m, idx, cache, past)

    paths = FastPaths([(1, 4, Plain())])
    install(model, paths)
    ids = torch.randint(0, 97, (1, 5))
    ref = copy.deepcopy(model)
    for m in (model, ref):
        set_adapter(m, "a")
    assert torch.equal(model.generate(ids, 4), ref.generate(ids, 4)) and not calls
    assert paths.decode_steps == {"fast": 0, "model": 3}  # what ran, counted
    for m in (model, ref):  # merged: the update is in the weights the path reads
        merge_adapter(m, "a")
    assert torch.equal(model.generate(ids, 4), ref.generate(ids, 4)) and calls
    assert paths.decode_steps == {"fast": 3, "model": 3}


def test_optimize_keeps_the_fused_step_for_a_model_with_an_active_adapter(tmp_path):
    model = _model()
    set_adapter(model, "a")
    cfg = OptimizeConfig(
        cache_dir=tmp_path, backends=(), fast_paths=("numba_fused_decode[serial]",), repeat=5
    )
    fast = optimize(model, config=cfg)
    site = next(s for s in fast.optimization_report.sites if s.kind == "decode step")
    res = [c for r in site.cases for c in r.candidates]
    assert all(c.status in ("faster", "slower") for c in res), [c.detail for c in res]
    assert all(c.rel_error < TOL[torch.float32] for c in res)
    ids = torch.randint(0, 97, (2, 5))
    assert torch.equal(fast.generate(ids, 10), model.generate(ids, 10))


@pytest.mark.parametrize("path", ["torch_static_decode", "numba_decoder[fp32]"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_hf_decoder_serves_merged_adapters_through_its_decode_loop(family, path):
    pytest.importorskip("transformers")
    from ryzen_opt.optimization import families
    from ryzen_opt.optimization.fastpaths import generate as fgen
    from tests.optimizer.hf_models import left_padded, tiny

    targets = ("q_proj", "v_proj", "down_proj") if family == "llama" else ("c_attn", "c_fc")
    model = tiny(family)
    for name in ("a", "b"):
        add_lora(model, LoraConfig(rank=4, alpha=8, target_modules=targets), name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    merge_adapter(model, "a")
    fam, why = families.find(model)
    assert why is None  # LoRA layers are read through their (merged) base weights
    fgen.install(model, fam.layout(model), [(1, 4, path)])
    original = type(model).generate.__get__(model)
    ids, mask = left_padded(2, 7, [0, 2])
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)

    def check(fast_loop):
        out = model.generate(ids, **kw)
        route = model.generate.last_route
        assert (route == path) == fast_loop, route
        assert torch.equal(out, original(ids, **kw))
        return out

    with_a = check(True)  # merged a: in the weights the loop reads
    unmerge_adapter(model)
    set_adapter(model, "b")  # unmerged b: the model's own code adds its update
    check(False)
    merge_adapter(model, "b")
    assert not torch.equal(check(True), with_a)  # merged b: the loop follows the switch


def _graph_step(path, model, ref, ids):
    """The path's logits for the last token (cache from ``ref``'s prefill) and ``ref``'s. The
    path's cache view is dropped before returning: its buffer serves one generation at a time."""
    with torch.no_grad():
        _, cache = ref(ids[:, :-1])
        want, _ = ref(ids[:, -1:], cache)
        got, view = path(model, ids[:, -1:], cache, ids.shape[1] - 1)
    del view
    return got, want


@pytest.mark.gpu
def test_the_triton_decode_graph_adds_unmerged_adapters_without_recapture():
    """GPU: ``triton_graph_decode`` serves an active adapter, a switch and a mixed batch from
    one captured graph (the tables change, not the graph); more adapters than its tables hold
    recapture over the same cache."""
    from ryzen_opt.optimization.fastpaths import make_path

    model = _model().cuda()
    ref = copy.deepcopy(model)  # the model's own code
    path = make_path("triton_graph_decode")
    assert path.why_not(model) is None and path.serves_lora
    install(model, FastPaths([(1, 4, path)]))
    ids = torch.randint(0, 97, (3, 6), device="cuda")
    graph = None
    for name in ("b", "a", None, "b"):
        set_adapter(model, name)
        set_adapter(ref, name)
        got, want = _graph_step(path, model, ref, ids)
        assert_close_rel(got, want, TOL[torch.float32], f"adapter {name}")
        graph = graph or path.graphs[3].graph
        assert path.graphs[3].graph is graph  # no recapture for a switch
        assert torch.equal(model.generate(ids, 8), ref.generate(ids, 8))
    rows = ["a", None, "b"]
    with mixed_batch(model, rows), mixed_batch(ref, rows):
        got, want = _graph_step(path, model, ref, ids)
    assert_close_rel(got, want, TOL[torch.float32], "mixed batch")
    assert path.graphs[3].graph is graph
    # A third adapter of a larger rank than the tables hold: new tables, a new capture.
    add_lora(model, LoraConfig(rank=32, alpha=8, target_modules=TARGETS), "c")
    add_lora(ref, LoraConfig(rank=32, alpha=8, target_modules=TARGETS), "c")
    with torch.no_grad():
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            if "__c" in n:  # A is random per model: the same values in both
                if "lora_B__c" in n:
                    p.normal_(0, 0.2)
                q.copy_(p)
    set_adapter(model, "c")
    set_adapter(ref, "c")
    got, want = _graph_step(path, model, ref, ids)
    assert_close_rel(got, want, TOL[torch.float32], "adapter c (rank 32)")
    assert path.graphs[3].graph is not graph
