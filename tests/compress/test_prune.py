"""Pruning: magnitude sparsity, structured removal (scoring, shapes, export), 2:4 on GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ryzen_opt.compress import (
    OnnxGenerator,
    PruneConfig,
    export_onnx,
    finetune,
    magnitude_prune,
    prune_vocabulary,
    semi_structured_24,
    structured_prune,
)
from ryzen_opt.compress.prune import (
    PrunedAttention,
    prunable_weight_count,
    prune_24_mask,
    sparsity,
)
from tests.assertions import TOL, assert_close_rel
from tests.compress.conftest import tiny_model


def test_magnitude_prune_zeroes_the_smallest_fraction(model):
    before = [p.clone() for p in model.parameters()]
    pruned, masks = magnitude_prune(model, 0.3)
    assert abs(sparsity(pruned) - 0.3) < 1e-3
    for p, q in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, q)  # the input model is untouched
    kept = torch.cat([m.flatten() for m in masks.values()])
    ws = torch.cat([b.attn.qkv.weight.flatten() for b in model.blocks])
    assert kept.float().mean() == pytest.approx(0.7, abs=1e-3)
    # Every removed weight is no larger than every kept one (global threshold).
    all_w = torch.cat([lin.weight.abs().flatten() for lin in _lins(model)])
    assert all_w[~kept].max() <= all_w[kept].min()
    assert ws.numel() > 0


def _lins(m):
    return [lin for b in m.blocks for lin in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)]


def test_structured_prune_removes_the_ratio_and_keeps_the_interface(model, task):
    pruned = structured_prune(model, task, 0.3, calibration_samples=32)
    removed = 1 - prunable_weight_count(pruned) / prunable_weight_count(model)
    assert abs(removed - 0.3) < 0.03
    assert pruned.num_parameters() < model.num_parameters()
    assert all(isinstance(b.attn, PrunedAttention) for b in pruned.blocks)
    assert model.blocks[0].mlp.fc1.out_features == 64  # input untouched
    ids = torch.randint(3, 32, (2, 5))
    with torch.no_grad():
        full, cache = pruned(ids)
        step, _ = pruned(ids[:, 4:5], tuple((k[:, :, :4], v[:, :, :4]) for k, v in cache))
        out = pruned.generate(ids, 6, eos_id=2)
    assert_close_rel(step[:, 0], full[:, 4], TOL[torch.float32], "cached step")
    assert out.shape[0] == 2


def test_structured_prune_at_ratio_zero_is_exact(model, task):
    pruned = structured_prune(model, task, 0.0, calibration_samples=8)
    ids = torch.randint(3, 32, (3, 7))
    with torch.no_grad():
        assert_close_rel(pruned(ids)[0], model(ids)[0], TOL["fp32_exact"], "ratio 0")


def test_structured_prune_drops_a_dead_head_and_dead_channels(task):
    m = tiny_model(seed=3, num_heads=4, ff_dim=64)
    d = m.config.head_dim
    with torch.no_grad():
        for b in m.blocks:
            b.attn.proj.weight[:, 2 * d : 3 * d] = 0  # head 2 contributes nothing
            b.mlp.fc2.weight[:, :10] = 0  # channels 0..9 contribute nothing
    ref_qkv = m.blocks[0].attn.qkv.weight.detach().clone()
    pruned = structured_prune(m, task, 0.25, calibration_samples=32)
    for b in pruned.blocks:
        assert b.attn.num_heads == 3
    kept_q = pruned.blocks[0].attn.qkv.weight[: 3 * d]
    expect = torch.cat([ref_qkv[: 2 * d], ref_qkv[3 * d : 4 * d]])
    assert torch.equal(kept_q, expect)  # heads 0, 1, 3 survive, in order
    # A quarter of the weights: 1 head of 4 (4*C*d) plus FFN channels for the rest;
    # the dead ones go first.
    fc1 = m.blocks[0].mlp.fc1.weight
    kept_rows = pruned.blocks[0].mlp.fc1.weight
    dead = fc1[:10]
    for row in dead:
        assert not (kept_rows == row).all(dim=1).any()


def test_pruned_model_exports_with_logit_parity(model, task, tmp_path):
    pruned = structured_prune(model, task, 0.5, calibration_samples=16)
    path = export_onnx(pruned, tmp_path / "pruned.onnx")
    gen = OnnxGenerator(path)
    ids = torch.randint(3, 32, (3, 6))
    with torch.no_grad():
        ref, cache = pruned(ids)
        ref2, _ = pruned(ids[:, :1], cache)
    out, past = gen.forward(ids.numpy())
    assert past[0].shape[1] == pruned.blocks[0].attn.num_heads
    assert_close_rel(torch.from_numpy(out), ref, TOL[torch.float32], "pruned prefill")
    out2, _ = gen.forward(ids[:, :1].numpy(), past=past)
    assert_close_rel(torch.from_numpy(out2), ref2, TOL[torch.float32], "pruned decode")
    with torch.no_grad():
        np.testing.assert_array_equal(
            gen.generate(ids.numpy(), 10), pruned.generate(ids, 10).numpy()
        )


def test_vocabulary_pruning_keeps_the_task_ids_and_their_logits(model, task):
    small = prune_vocabulary(model, task, calibration_samples=64)
    assert small.config.vocab_size == task.tokenizer.vocab_size == 17
    assert small.head.weight is small.tok_emb.weight  # still tied
    ids = task.encode_prompts(task.sample("test", 4, 0))
    with torch.no_grad():
        full, _ = model(ids)
        part, _ = small(ids)
    assert_close_rel(part, full[..., :17], TOL["fp32_exact"], "kept logits")
    assert model.config.vocab_size == 32  # input untouched


def _task_loss(m, task, n=64):
    x, y = task.encode_training(task.sample("validation", n, 5))
    with torch.no_grad():
        logits, _ = m(x)
    return float(
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    )


def test_finetune_lowers_task_loss_and_keeps_masked_zeros(model, task):
    pruned, masks = magnitude_prune(model, 0.5)
    before = _task_loss(pruned, task)
    finetune(pruned, task, steps=30, lr=3e-3, batch_size=32, masks=masks)
    assert _task_loss(pruned, task) < before
    assert abs(sparsity(pruned) - 0.5) < 1e-3


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.3", True, float("nan")])
def test_bad_ratio_raises_naming_it(model, task, bad):
    with pytest.raises(ValueError, match="compression_ratio"):
        magnitude_prune(model, bad)
    with pytest.raises(ValueError, match="compression_ratio"):
        structured_prune(model, task, bad)
    with pytest.raises(ValueError, match="compression_ratio"):
        PruneConfig(compression_ratio=bad)


def test_prune_rejects_wrong_types(task, model):
    with pytest.raises(TypeError, match="model"):
        structured_prune(torch.nn.Linear(2, 2), task)
    with pytest.raises(TypeError, match="task"):
        structured_prune(model, "arithmetic")
    with pytest.raises(ValueError, match="kind"):
        PruneConfig(kind="random")
    assert PruneConfig(finetune_steps=5).to_dict()["finetune_steps"] == 5


def test_24_mask_keeps_two_largest_of_four():
    w = torch.tensor([[1.0, -4.0, 3.0, 0.5, 0.1, 0.2, -0.3, 0.0]])
    m = prune_24_mask(w)
    assert m.tolist() == [[False, True, True, False, False, True, True, False]]
    with pytest.raises(ValueError, match="weight"):
        prune_24_mask(torch.zeros(2, 6))


def test_24_needs_cuda(model):
    with pytest.raises(ValueError, match="CUDA"):
        semi_structured_24(model)


@pytest.mark.gpu
def test_24_sparse_linears_match_masked_dense_on_gpu():
    m = tiny_model(seed=1, embedding_dim=128, num_heads=2, ff_dim=256).cuda()
    sparse = semi_structured_24(m, torch.float16)
    ref = m.half()
    with torch.no_grad():
        for lin in _lins(ref):
            lin.weight.mul_(prune_24_mask(lin.weight))
        ids = torch.randint(3, 32, (32, 16), device="cuda")
        assert_close_rel(
            sparse(ids)[0].float(), ref(ids)[0].float(), TOL[torch.float16], "2:4 logits"
        )
