"""Convergence: N training steps of the original and of ``optimize_training``'s model from the
same weights on the same batches give the same loss at every step, logits and parameters.

The fused candidates are forced (``TrainingConfig.force``), so these tests check the fused
path itself on this CPU, whether or not it is faster here. Tolerances are Liger-Kernel's
convergence tests' (``test/convergence``): loss fp32 atol 1e-8 / rtol 1e-5, bf16 atol 1e-3 /
rtol 1e-2; logits and parameters fp32 atol 5e-3 / rtol 1e-5, bf16 atol 1e-1 / rtol 1e-2.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ryzen_opt import optimize_training
from ryzen_opt.training import TrainingConfig, candidates, causal_lm_loss
from ryzen_opt.training.families import FusedLMHead, find
from tests.training.minimodels import FAMILIES, batches, build

STEPS = 12
# AdamW's step is about lr whatever the gradient's size: at 1e-2 a bf16 run amplifies the
# rounding of the baseline's own bf16 softmax into 1.4% loss differences within 12 steps (the
# fused head's softmax is float32); 1e-3 still trains (the loss falls) and stays comparable.
LR = {torch.float32: 1e-2, torch.bfloat16: 1e-3}
TOL = {  # (loss atol, loss rtol, logits/params atol, logits/params rtol)
    torch.float32: (1e-8, 1e-5, 5e-3, 1e-5),
    torch.bfloat16: (1e-3, 1e-2, 1e-1, 1e-2),
}


def _train(model, data, lr):
    """``len(data)`` AdamW steps; the loss of each (dropout masks seeded per step)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step, batch in enumerate(data):
        torch.manual_seed(step)
        loss = causal_lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().float())
    return torch.stack(losses)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(batch["input_ids"])
    return out[0] if isinstance(out, tuple) else out.logits


def _converge(family, dtype, cfg, check_fused=True):
    return _converge_model(
        build(family, dtype),
        batches(family, 1, seed=99)[0],
        batches(family, 2) * (STEPS // 2),  # seen again, so the loss must fall
        batches(family, 1, seed=7)[0],
        dtype,
        cfg,
        check_fused,
    )


def _converge_model(base, example, data, probe, dtype, cfg, check_fused=True, lr=None):
    fast = optimize_training(base, example, config=cfg)
    assert fast.optimization_report.changed, fast.optimization_report.to_markdown()
    fam, _ = find(fast)
    if check_fused:
        assert isinstance(fam.head(fast), FusedLMHead)
    fast_losses = _train(fast, data, lr or LR[dtype])
    base_losses = _train(base, data, lr or LR[dtype])
    la, lr, pa, pr = TOL[dtype]
    torch.testing.assert_close(fast_losses, base_losses, atol=la, rtol=lr)
    assert base_losses[-1] < base_losses[0]  # it trained
    torch.testing.assert_close(_logits(fast, probe), _logits(base, probe), atol=pa, rtol=pr)
    bp, fp = dict(base.named_parameters()), dict(fast.named_parameters())
    assert bp.keys() == fp.keys()
    for name, p in bp.items():
        torch.testing.assert_close(fp[name], p, atol=pa, rtol=pr, msg=name)
    return fast


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_lce_converges_like_the_original_fp32(family):
    cfg = TrainingConfig(candidates=("chunked_lce",), force=("chunked_lce",))
    fast = _converge(family, torch.float32, cfg)
    head = find(fast)[0].head(fast)
    assert head.kernel == "chunked_lce"


@pytest.mark.parametrize("family", ["seed", "llama"])
def test_fused_lce_converges_like_the_original_bf16(family):
    cfg = TrainingConfig(candidates=("chunked_lce",), force=("chunked_lce",))
    _converge(family, torch.bfloat16, cfg)


@pytest.mark.parametrize("family", ["seed", "gpt2"])
def test_chunked_lce_with_small_chunks_converges(family):
    # several chunks per batch: the chunk loop and the row gather are exercised
    cfg = TrainingConfig(candidates=("chunked_lce",), force=("chunked_lce",), chunk_size=3)
    _converge(family, torch.float32, cfg)


# ---------------------------------------------------------------- the GPU wiring, on the CPU
# The Triton kernels' contract, computed by PyTorch: the tests below check that the module
# swaps of the CUDA candidates compute the original model (the kernels are tested elsewhere).


GPU_CANDIDATES = (
    "triton_lce",
    "triton_gelu",
    "triton_swiglu",
    "triton_norm_residual",
    "triton_norm",
)


class _StandIn:
    @staticmethod
    def linear_cross_entropy(h, w, labels, bias=None, *, ignore_index=-100, chunk_size=None):
        return F.cross_entropy(F.linear(h, w, bias).float(), labels, ignore_index=ignore_index)

    @staticmethod
    def swiglu(gate, up):
        return F.silu(gate) * up

    @staticmethod
    def gelu(x, approximate="none"):
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def layer_norm_residual(x, residual, weight, bias, eps):
        h = x if residual is None else x + residual
        return F.layer_norm(h, h.shape[-1:], weight, bias, eps), h

    @staticmethod
    def rms_norm_residual(x, residual, weight, eps):
        h = x if residual is None else x + residual
        return F.rms_norm(h.float(), h.shape[-1:], weight.float(), eps).to(h.dtype), h


def _on_the_cpu(monkeypatch):
    """Allow the CUDA candidates on the CPU for one test."""
    for name in GPU_CANDIDATES:
        c = candidates.CANDIDATES[name]
        monkeypatch.setitem(candidates.CANDIDATES, name, dataclasses.replace(c, devices=("cpu",)))


def _converge_with_every_gpu_candidate(family):
    """Force every CUDA candidate; the step converges like the original's with each fused part
    installed where the family has it."""
    cfg = TrainingConfig(candidates=GPU_CANDIDATES, force=GPU_CANDIDATES)
    fast = _converge(family, torch.float32, cfg)
    chosen = {s.kind: s.chosen.get("train step") for s in fast.optimization_report.sites}
    mlp = "triton_swiglu" if family in ("llama", "qwen2") else "triton_gelu"
    assert chosen["loss head"] == "triton_lce" and chosen["mlp activation"] == mlp
    norm = "triton_norm_residual" if family == "seed" else "triton_norm"
    assert chosen["norm + residual"] == norm


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_candidate_wiring_converges_like_the_original(family, monkeypatch):
    monkeypatch.setattr(candidates, "gpu_ops", lambda: (_StandIn, None))
    _on_the_cpu(monkeypatch)
    _converge_with_every_gpu_candidate(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_triton_kernels_converge_like_the_original(family, monkeypatch):
    # The Triton kernels themselves, under the interpreter (TRITON_INTERPRET=1, set for the
    # test run by tests/conftest.py).
    pytest.importorskip("triton")
    from ryzen_opt.kernels.triton import _common as triton_common

    if not triton_common.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (the Triton kernels on CPU tensors)")
    _on_the_cpu(monkeypatch)
    _converge_with_every_gpu_candidate(family)


# ---------------------------------------------------------------- real sizes, on the GPU

REAL = {  # a Llama at 1/2 the width and 1/2 the depth of the 1.2B benchmark model, GPT-2 small
    "llama": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=1024, vocab_size=32000,
    ),
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=32000),
}  # fmt: skip
# Liger-Kernel's convergence tests' learning rate (their `run_mini_model`: lr 1e-5), the rate
# their tolerances go with. At the rates the small CPU models take (1e-2, 1e-3) a model of
# this size amplifies any rounding, the original's own included: trained from weights one ulp
# apart, the original itself ends further apart than the tolerances (bf16 logits 0.28-0.34
# at 1e-3 and 3e-4; `python -m bench.train_noise_floor`, bench/results/h200/train_noise_floor.txt).
REAL_LR = 1e-5


def _real_batches(n, seed, rows=2, seq=1024, vocab=32000):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (rows, seq), generator=g).cuda()
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": ids.ne(-1).long()})
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_triton_kernels_converge_at_real_size_on_the_gpu(family, dtype):
    # The CPU tests' checks at transformer sizes (sequence 1024, vocabulary 32000), with every
    # Triton candidate forced: each step's loss, then logits and parameters after 12 steps.
    from tests.optimizer.hf_models import tiny  # (the gpu marker skips it without CUDA)

    base = tiny(family, dtype, **REAL[family]).cuda()
    cfg = TrainingConfig(candidates=GPU_CANDIDATES, force=GPU_CANDIDATES)
    data = _real_batches(2, seed=0) * (STEPS // 2)
    probe = _real_batches(1, seed=7)[0]
    fast = _converge_model(base, _real_batches(1, 99)[0], data, probe, dtype, cfg, lr=REAL_LR)
    chosen = {s.kind: s.chosen.get("train step") for s in fast.optimization_report.sites}
    mlp = "triton_swiglu" if family == "llama" else "triton_gelu"
    assert chosen == {
        "loss head": "triton_lce",
        "mlp activation": mlp,
        "norm + residual": "triton_norm",
    }
