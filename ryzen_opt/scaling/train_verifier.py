"""Train a :class:`~ryzen_opt.scaling.LearnedVerifier` on the policy's own samples.

Command line::

    python -m ryzen_opt.scaling.train_verifier --checkpoint checkpoints/default \\
        --out bench/results/cpu/scaling_verifier

Samples ``--samples`` candidates for each of ``--prompts`` training-split problems with the
engine (the same sampler the benchmark uses), labels each with the task's checker, and
fine-tunes a verifier initialised from the policy with binary cross-entropy. Reports, on
validation-split problems: AUC, and the best-of-k accuracy the verifier reaches against the
coverage (the checker's ceiling). Writes ``verifier.safetensors`` + ``verifier.yaml``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ryzen_opt.models.checkpoint import CheckpointError, load_checkpoint
from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.models.tasks import ArithmeticTask
from ryzen_opt.scaling.config import SamplingConfig
from ryzen_opt.scaling.engine import InferenceScalingEngine
from ryzen_opt.scaling.learned import LearnedVerifier
from ryzen_opt.scaling.selection import select_max


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``(weights folder, run folder)`` for a run folder or a checkpoint folder.

    A training run (``ryzen_opt.models.train --out RUN``) keeps its weights in
    ``RUN/checkpoint`` and the task in ``RUN/metrics.json``; either folder is accepted.
    """
    path = Path(path)
    if (path / "config.yaml").is_file():
        run = path.parent if not (path / "metrics.json").is_file() else path
        return path, run
    if (path / "checkpoint" / "config.yaml").is_file():
        return path / "checkpoint", path
    raise CheckpointError(
        f"checkpoint {str(path)!r} has neither config.yaml nor checkpoint/config.yaml"
    )


def load_policy(
    path: str | Path, device: str = "cpu"
) -> tuple[SimpleTransformerModel, ArithmeticTask, dict[str, Any]]:
    """Load a trained checkpoint and its task (from the run's ``metrics.json``).

    Args:
        path: a run folder or its ``checkpoint`` folder.
        device: where to put the model.

    Returns:
        ``(model, task, info)``; info has the paths and the weights' sha256.
    """
    wdir, run = resolve_checkpoint(path)
    metrics_file = run / "metrics.json"
    if not metrics_file.is_file():
        raise CheckpointError(
            f"{str(metrics_file)!r} (the task's digits and operators) does not exist"
        )
    metrics = json.loads(metrics_file.read_text())
    t = metrics.get("task", {})
    task = ArithmeticTask(int(t.get("digits", 3)), str(t.get("operators", "+")))
    model = load_checkpoint(wdir, map_location=device)
    sha = hashlib.sha256((wdir / "model.safetensors").read_bytes()).hexdigest()
    info = {"checkpoint": str(wdir), "weights_sha256": sha, "metrics": metrics}
    return model, task, info


@dataclass
class VerifierTrainConfig:
    """Settings of :func:`train_verifier`."""

    prompts: int = 1500  # training problems; x samples = labelled candidates
    samples: int = 8
    val_prompts: int = 200
    steps: int = 2000
    batch_size: int = 256
    # Only the small head trains, on standardised features: a usual MLP rate.
    lr: float = 3e-3
    weight_decay: float = 0.01
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompts", "samples", "val_prompts", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def _sample(model, task, split: str, cfg: VerifierTrainConfig, seed: int, count: int):
    problems = task.sample(split, count, seed)
    engine = InferenceScalingEngine(
        model, task, sampler=SamplingConfig(temperature=cfg.temperature, seed=seed)
    )
    res = engine.best_of_n([task.prompt(p) for p in problems], cfg.samples, task.max_answer_len)
    prompts, comps, labels, groups = [], [], [], []
    for g, r in enumerate(res):
        pid = task.tokenizer.encode(r.prompt)
        for c in r.candidates:
            prompts.append(pid)
            comps.append(c.token_ids)
            labels.append(float(c.verified))
            groups.append(g)
    return prompts, comps, torch.tensor(labels), groups, res


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    pos, neg = scores[labels > 0.5], scores[labels < 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    # Mann-Whitney U: the chance a correct candidate outscores an incorrect one.
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def _evaluate(ver: LearnedVerifier, data) -> dict[str, float]:
    prompts, comps, labels, groups, res = data
    scores = []
    for i in range(0, len(prompts), 1024):
        scores += ver.score(prompts[i : i + 1024], comps[i : i + 1024])
    s = torch.tensor(scores)
    picked, k = 0, 0
    for r in res:
        cs = r.candidates
        j = select_max(s[k : k + len(cs)].tolist(), [c.mean_logprob for c in cs])
        picked += cs[j].verified
        k += len(cs)
    n = len(res)
    return {
        "auc": _auc(s, labels),
        "accuracy@0.5": float(((s > 0.5).float() == labels).float().mean()),
        "best_of_k_accuracy": picked / n,
        "coverage": sum(r.covered for r in res) / n,
        "pass@1": float(labels.mean()),
    }


def train_verifier(
    model: SimpleTransformerModel,
    task: ArithmeticTask,
    cfg: VerifierTrainConfig,
    *,
    log: bool = True,
) -> LearnedVerifier:
    """Sample, label and fine-tune; returns the verifier with metrics in ``.meta``.

    Args:
        model: the policy (its samples are the training data; it is not changed).
        task: the task whose checker labels the samples.
        cfg: settings.
        log: print progress lines.

    Returns:
        The trained verifier (eval mode).

    Example:
        >>> # ver = train_verifier(model, task, VerifierTrainConfig(steps=300))
    """
    t0 = time.perf_counter()
    train = _sample(model, task, "train", cfg, cfg.seed + 1, cfg.prompts)
    val = _sample(model, task, "validation", cfg, cfg.seed + 2, cfg.val_prompts)
    sample_s = time.perf_counter() - t0
    if log:
        print(
            f"sampled {len(train[0])} train / {len(val[0])} validation candidates in "
            f"{sample_s:.1f}s; train share correct {float(train[2].mean()):.3f}"
        )
    torch.manual_seed(cfg.seed)
    ver = LearnedVerifier.from_policy(model, vocab_size=task.tokenizer.vocab_size)
    before = _evaluate(ver, val)
    # The backbone is frozen: compute its features once, then train only the head.
    ids, lengths, starts = ver.batch(train[0], train[1])
    feats = torch.cat(
        [
            ver.features(ids[i : i + 2048], lengths[i : i + 2048], starts[i : i + 2048])
            for i in range(0, len(ids), 2048)
        ]
    )
    ver.feat_mean.copy_(feats.mean(0))
    ver.feat_std.copy_(feats.std(0).clamp_min(1e-4))
    labels = train[2].to(feats.device)
    opt = torch.optim.AdamW(ver.score_head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    ver.train()
    t1 = time.perf_counter()
    for step in range(cfg.steps):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(labels), (cfg.batch_size,), generator=gen).to(feats.device)
        loss = F.binary_cross_entropy_with_logits(ver.head_logits(feats[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step + 1) % 500 == 0:
            print(f"step {step + 1}/{cfg.steps} loss {float(loss.detach()):.4f}")
    ver.eval()
    after = _evaluate(ver, val)
    ver.meta = {
        "task": task.to_dict(),
        "train_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "train_candidates": len(train[0]),
        "train_share_correct": float(train[2].mean()),
        "validation_before": before,
        "validation_after": after,
        "sample_seconds": round(sample_s, 1),
        "train_seconds": round(time.perf_counter() - t1, 1),
        "torch": str(torch.__version__),
    }
    if log:
        print(f"validation before {before}\nvalidation after  {after}")
    return ver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ryzen_opt.scaling.train_verifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--checkpoint",
        default="checkpoints/default",
        help="run folder (with metrics.json) or its checkpoint folder",
    )
    ap.add_argument(
        "--out",
        default="bench/results/cpu/scaling_verifier",
        help="folder for verifier.safetensors + verifier.yaml",
    )
    ap.add_argument("--device", default="cpu")
    defaults = VerifierTrainConfig()
    for name in ("prompts", "samples", "val_prompts", "steps", "batch_size", "seed"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "temperature"):
        ap.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    args = ap.parse_args(argv)
    model, task, info = load_policy(args.checkpoint, args.device)
    cfg = VerifierTrainConfig(
        prompts=args.prompts,
        samples=args.samples,
        val_prompts=args.val_prompts,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        temperature=args.temperature,
        seed=args.seed,
    )
    ver = train_verifier(model, task, cfg)
    ver.meta["policy"] = {
        "checkpoint": info["checkpoint"],
        "weights_sha256": info["weights_sha256"],
    }
    out = ver.save(args.out)
    print(f"saved {out / 'verifier.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
