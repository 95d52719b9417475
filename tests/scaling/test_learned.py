"""LearnedVerifier: scoring, safetensors + yaml round-trip, training, use by the engine."""

from __future__ import annotations

import json

import pytest
import torch

from ryzen_opt.models import ArithmeticTask, save_checkpoint
from ryzen_opt.scaling import InferenceScalingEngine, LearnedVerifier, SamplingConfig
from ryzen_opt.scaling.train_verifier import VerifierTrainConfig, load_policy, train_verifier

from .conftest import make_tiny


@pytest.fixture
def task():
    return ArithmeticTask(digits=1, operators="+")


@pytest.fixture
def policy(task):
    return make_tiny(sharpen=3.0)


def test_from_policy_copies_a_frozen_backbone_and_reads_causally(policy, task):
    ver = LearnedVerifier.from_policy(policy, vocab_size=task.tokenizer.vocab_size)
    v = task.tokenizer.vocab_size
    assert torch.equal(ver.backbone.tok_emb.weight, policy.tok_emb.weight[:v])
    assert not any(p.requires_grad for p in ver.backbone.parameters())
    with torch.no_grad():
        for w in ver.score_head.parameters():
            w.normal_()
    a = ver.score([[1, 4, 5]], [[6, 2]])
    # Right padding after a shorter pair must not change its score.
    b = ver.score([[1, 4, 5], [1, 4, 5]], [[6, 2], [6, 7, 8, 2]])
    assert a[0] == pytest.approx(b[0], abs=1e-6)
    assert b[0] != pytest.approx(b[1], abs=1e-6)
    assert all(0 < s < 1 for s in b)
    # Ids the scorer does not know (a policy's unused vocabulary) are read as padding.
    assert ver.score([[1, 4, 5]], [[30, 2]])[0] == pytest.approx(
        ver.score([[1, 4, 5]], [[0, 2]])[0], abs=1e-6
    )


def test_save_and_load_round_trip_without_pickle(policy, task, tmp_path):
    ver = LearnedVerifier.from_policy(policy, vocab_size=task.tokenizer.vocab_size)
    with torch.no_grad():
        for w in ver.score_head.parameters():
            w.normal_()
        ver.feat_mean.normal_()
    ver.meta = {"task": task.to_dict()}
    ver.save(tmp_path / "v")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == [
        "verifier.safetensors",
        "verifier.yaml",
    ]
    back = LearnedVerifier.load(tmp_path / "v")
    pairs = ([[1, 4, 5], [1, 6, 7]], [[6, 2], [9, 9, 2]])
    assert back.score(*pairs) == pytest.approx(ver.score(*pairs), abs=1e-7)
    assert back.meta["task"] == task.to_dict()


def test_loading_a_corrupt_or_missing_verifier_raises_naming_the_file(policy, task, tmp_path):
    with pytest.raises(ValueError, match="verifier.yaml"):
        LearnedVerifier.load(tmp_path / "nothing")
    LearnedVerifier.from_policy(policy, vocab_size=17).save(tmp_path / "v")
    (tmp_path / "v" / "verifier.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="verifier.safetensors.* corrupt"):
        LearnedVerifier.load(tmp_path / "v")


def test_training_fits_the_head_and_the_engine_uses_the_scores(policy, task, tmp_path):
    cfg = VerifierTrainConfig(
        prompts=40, samples=4, val_prompts=10, steps=30, batch_size=32, lr=1e-3
    )
    ver = train_verifier(policy, task, cfg, log=False)
    meta = ver.meta
    assert torch.equal(ver.backbone.tok_emb.weight, policy.tok_emb.weight[:17])
    assert meta["train_candidates"] == 160
    assert (
        0 <= meta["validation_after"]["best_of_k_accuracy"] <= meta["validation_after"]["coverage"]
    )
    json.dumps(meta)
    ver.save(tmp_path / "trained")  # the metadata must be plain YAML
    assert LearnedVerifier.load(tmp_path / "trained").meta["train_candidates"] == 160
    eng = InferenceScalingEngine(
        policy, task, learned_verifier=ver, strategy="learned", sampler=SamplingConfig(seed=1)
    )
    for r in eng.best_of_n(["3+4=", "1+1=", "9+9="], 6, task.max_answer_len):
        scores = [c.learned_score for c in r.candidates]
        assert None not in scores
        assert scores[r.index] == max(scores)
        assert set(r.choices) == {"verifier", "majority", "weighted_vote", "learned", "logprob"}
        assert r.counters.learned_s > 0


def test_load_policy_reads_a_training_run_folder(policy, task, tmp_path):
    save_checkpoint(policy, tmp_path / "run" / "checkpoint")
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"task": task.to_dict()}))
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoint"):
        model, t, info = load_policy(path)
        assert t.to_dict() == task.to_dict()
        assert len(info["weights_sha256"]) == 64
        assert torch.equal(model.tok_emb.weight, policy.tok_emb.weight)
