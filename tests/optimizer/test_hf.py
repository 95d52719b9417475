"""optimize() on transformers decoders built from tiny configs (no downloaded weights).

Attention is served through transformers' AttentionInterface; the modules are not copied.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ryzen_opt import KernelOptimizer, optimize
from tests.optimizer.fakes import (
    CountingLauncher,
    fast_config,
    one_thread,
    reference_attention,
    registered,
    slow_baselines,
)

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install ryzen-opt[hf])"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _gpt2(impl):
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=impl)


def _llama(impl):
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl)


def _qwen2(impl):
    cfg = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.Qwen2ForCausalLM._from_config(cfg, attn_implementation=impl)


BUILDERS = {"gpt2": _gpt2, "llama": _llama, "qwen2": _qwen2}
# (2, 8): the measured prefill shape of fast_config, so the prefill route is hit too.
IDS = torch.tensor([[5, 7, 11, 13, 17, 19, 23, 29], [2, 3, 5, 8, 13, 21, 34, 55]])


@pytest.mark.parametrize("arch, impl", [("gpt2", "sdpa"), ("llama", "sdpa"), ("qwen2", "eager")])
def test_attention_is_served_through_the_attention_registry(arch, impl, tmp_path):
    torch.manual_seed(0)
    original = BUILDERS[arch](impl).eval()
    launcher = CountingLauncher(reference_attention)
    cfg = fast_config(
        tmp_path,
        backends=("fake_attn",),
        ops=("attention",),
        model_check=False,
        decode_batches=(2,),
    )
    with registered("attention", "fake_attn", launcher):
        opt = KernelOptimizer(cfg)
        work = copy.deepcopy(original)
        plan = opt.plan(work)
        assert plan.sites and all(s.kind == "attention" for s in plan.sites)
        slow_baselines(plan)
        model = opt.apply(work, plan)
        assert opt.report.changed, opt.report.to_markdown()
        assert model.config._attn_implementation == f"ryzen_opt_{impl}"
        assert original.config._attn_implementation == impl
        assert type(model) is type(original)
        assert list(model.state_dict()) == list(original.state_dict())
        calls = launcher.calls
        with torch.no_grad():
            ref = original(IDS).logits
            out = model(IDS).logits
        assert launcher.calls > calls
        err = float((out - ref).norm() / ref.norm())
        assert err <= 1e-4, err
        gen_kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(IDS, **gen_kw), original.generate(IDS, **gen_kw))


def test_wrong_attention_backend_is_rejected_and_implementation_restored(tmp_path):
    torch.manual_seed(0)
    original = _llama("sdpa").eval()
    wrong = CountingLauncher(reference_attention, scale=1.05)
    cfg = fast_config(tmp_path, backends=("fake_wrong",), ops=("attention",))
    with registered("attention", "fake_wrong", wrong):
        model = optimize(original, config=cfg)
    report = model.optimization_report
    statuses = {c.status for s in report.sites for k in s.cases for c in k.candidates}
    assert statuses == {"error"}
    assert not report.changed
    assert model.config._attn_implementation == "sdpa"


def _gpu_model(arch):
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=64, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_triton_attention_on_gpu_matches_the_original(arch, tmp_path):
    """The real Triton kernels in a transformers model on CUDA: same logits, same tokens."""
    torch.manual_seed(0)
    original = _gpu_model(arch).cuda().eval()
    cfg = fast_config(
        tmp_path, backends=("triton",), ops=("attention",), model_check=False, decode_batches=(2,)
    )
    opt = KernelOptimizer(cfg)
    work = copy.deepcopy(original)
    plan = opt.plan(work)
    slow_baselines(plan)  # keep every verified candidate, so the kernels really run below
    model = opt.apply(work, plan)
    assert opt.report.changed, opt.report.to_markdown()
    ids = IDS.cuda()
    with torch.no_grad():
        ref = original(ids).logits
        out = model(ids).logits
    err = float((out - ref).norm() / ref.norm())
    assert err <= cfg.tolerance_for(torch.float32, ids.device), err
    gen_kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **gen_kw), original.generate(ids, **gen_kw))


def test_synthetic_runs_fit_the_prefill_not_the_models_whole_context(tmp_path):
    from ryzen_opt.optimization.sites import hf_runs

    # A long context (Qwen2-0.5B has 4096) must not size the synthetic decode caches: at
    # batch 16 the set-up of a 4095-token cache materialised 40 GB of logits.
    cfg = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
    )
    model = transformers.Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    config = fast_config(tmp_path, prefill_shape=(2, 8), decode_batches=(1, 3))
    runs = hf_runs(model, None, config, torch.device("cpu"))
    decode = [r.shape for r in runs if r.label == "decode"]
    assert decode and all(int(s.split(" after ")[1]) < 8 for s in decode), decode
    assert {s.split(" ")[0] for s in decode} == {"1x1", "3x1"}
    # Like generate, the prefill asks for the last position's logits only.
    prefill = next(r for r in runs if r.label == "prefill")
    with torch.no_grad():
        assert prefill.call(model, prefill.setup(model)).shape == (2, 1, 64)


def test_a_failing_synthetic_run_does_not_blame_example_inputs(tmp_path):
    model = _llama("sdpa").eval()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    model.forward = broken
    with pytest.raises(ValueError, match="synthetic runs .*out of memory") as info:
        KernelOptimizer(fast_config(tmp_path)).plan(model)
    assert "example_inputs could not" not in str(info.value)
