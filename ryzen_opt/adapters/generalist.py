"""The instant adapters' base model: the seed checkpoint briefly fine-tuned on the seen tasks.

Text-to-LoRA and Transformer² adapt a base model that already has some of the skills asked
for: SVF only rescales the singular values of the base weights, so it can amplify a skill the
base half has, never teach one it lacks. The default checkpoint (3-digit ``+ - *``, plain
answers) scores 0-1% on most tasks of the family (:mod:`ryzen_opt.adapters.tasks`: new digit
counts, new answer formats; 18% and 9% on plain 3-digit sums and differences): adapted from
it, SVF experts reached 2% of the task LoRAs' accuracy (on an earlier version of the family).
This module makes the base the family is measured on instead: all weights of the default
checkpoint trained for a short run on an even mixture of the seen tasks, stopped while the
tasks are partly solved, so every adapter has something to add and something to amplify.
The held-out tasks stay out of its data.

Example:
    >>> from ryzen_opt.adapters.generalist import train_generalist  # doctest: +SKIP
    >>> res = train_generalist(model, steps=400)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ryzen_opt.adapters.tasks import SEEN, TaskSpec


def train_generalist(
    model: nn.Module,
    specs: Sequence[TaskSpec] = SEEN,
    steps: int = 400,
    batch: int = 126,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int = 0,
    eval_specs: Sequence[TaskSpec] = (),
    eval_samples: int = 128,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train every weight of ``model`` in place on an even mixture of ``specs``' tasks.

    AdamW (weight decay 0.01), linear warm-up over 50 steps then cosine to 10% of ``lr``
    (:func:`~ryzen_opt.adapters.instant.lr_at`), answer-token cross-entropy, each step's
    ``batch`` rows spread evenly over the tasks.

    Args:
        model: the model to train (changed in place).
        specs: the tasks of the mixture.
        steps: optimizer steps.
        batch: rows per step.
        lr: peak learning rate.
        seed: seeds the problems and the draw.
        eval_every: if > 0, the test exact match of ``eval_specs`` every this many steps.
        eval_specs: the tasks of those evaluations.
        eval_samples: validation problems per task and evaluation.
        stop_at: stop after this many steps of the ``steps``-step schedule (default: all):
            the tasks are still partly solved there (see ``checkpoints/instant/base``).

    Returns:
        ``{"losses", "train_seconds", "steps" (taken), "curve"}``; ``curve`` lists
        ``{"step", task name: accuracy, ...}`` rows (empty without ``eval_every``).
    """
    from ryzen_opt.adapters.instant import EVAL_SEED, TaskPool, loss_of, lr_at
    from ryzen_opt.models.train import evaluate

    stop_at = steps if stop_at is None else stop_at
    for key, v in (("steps", steps), ("batch", batch), ("eval_samples", eval_samples),
                   ("stop_at", stop_at)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} must be an int >= 1, got {v!r}")
    if stop_at > steps:
        raise ValueError(f"stop_at must be <= steps ({steps}), got {stop_at}")
    if not specs:
        raise ValueError("specs must name at least one task")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    tasks = [s.task for s in specs]
    pool = TaskPool(tasks, max(256, steps * batch // len(tasks)), seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses, curve, spent = [], [], 0.0

    def record(step: int) -> None:
        model.eval()
        row: dict[str, Any] = {"step": step}
        for s in eval_specs:
            row[s.name] = evaluate(model, s.task, "validation", eval_samples, seed=EVAL_SEED)
        curve.append(row)
        print(" ".join(f"{k} {v:.3f}" if k != "step" else f"step {v}" for k, v in row.items()),
              flush=True)  # fmt: skip

    for step in range(stop_at):
        if eval_every and step % eval_every == 0:
            record(step)
        t0 = time.perf_counter()
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        x, y = pool.batch([i % len(tasks) for i in range(batch)], gen)
        loss = loss_of(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        spent += time.perf_counter() - t0
    if eval_every:
        record(stop_at)
    model.eval()
    return {"losses": losses, "train_seconds": round(spent, 2), "steps": stop_at, "curve": curve}


def write_base(
    model: nn.Module,
    out: Path,
    steps: int,
    lr: float,
    eval_every: int,
    stop_at: int | None,
    eval_samples: int,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Train ``model`` with :func:`train_generalist` on the seen tasks, then save it as a
    checkpoint in ``out`` with ``metrics.json`` (``meta`` + the run's figures: the validation
    curve of 128 problems per task, test exact match of every task of the family).

    Returns:
        The metrics written.
    """
    from ryzen_opt.adapters.instant import EVAL_SEED
    from ryzen_opt.adapters.tasks import HELD_OUT
    from ryzen_opt.models.checkpoint import save_checkpoint
    from ryzen_opt.models.train import evaluate

    specs = SEEN + HELD_OUT
    res = train_generalist(model, SEEN, steps, lr=lr, eval_every=eval_every, eval_specs=specs,
                           stop_at=stop_at)  # fmt: skip
    acc = {s.name: evaluate(model, s.task, "test", eval_samples, seed=EVAL_SEED) for s in specs}
    save_checkpoint(model, out)
    metrics = {
        **meta,
        "mixture": [s.name for s in SEEN],
        "final_loss": res["losses"][-1],
        "train_seconds": res["train_seconds"],
        "steps": res["steps"],
        "schedule_steps": steps,
        "lr": lr,
        "curve_128_val_problems": res["curve"],
        "test_exact_match": acc,
        "eval_samples": eval_samples,
    }
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
