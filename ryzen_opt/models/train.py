"""Train ``SimpleTransformerModel`` on the arithmetic task.

Command line::

    python -m ryzen_opt.models.train --config configs/train_default.yaml --out runs/default
    python -m ryzen_opt.models.train --config configs/train_default.yaml --out runs/opt --optimized

writes ``checkpoint/`` (safetensors + config), ``train_config.yaml``, ``loss.json``,
``loss.png`` and ``metrics.json`` into ``--out``. Training is bit-reproducible for a seed on
one machine and thread count: data come from a seeded numpy generator, weights from a seeded
torch generator, and torch runs with deterministic algorithms.

``--optimized`` trains the copy :func:`ryzen_opt.optimize_training` returns for the initial
weights and the first batch (same seed, same data order; its report goes to
``optimize_training.md``); the loss of both is :func:`ryzen_opt.training.causal_lm_loss`,
which for the original model is the plain logits + ``F.cross_entropy``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ryzen_opt.models.checkpoint import save_checkpoint
from ryzen_opt.models.config import (
    ConfigError,
    ModelConfig,
    _check_positive_int,
    _check_real,
    load_yaml_mapping,
    short_repr,
)
from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.models.tasks import ArithmeticTask
from ryzen_opt.training.families import causal_lm_loss


@dataclass
class TrainConfig:
    """Everything a training run depends on."""

    model: ModelConfig = field(default_factory=ModelConfig)
    digits: int = 3
    # "+" alone is learned almost perfectly (99.6% after 2500 steps); "*" keeps it imperfect.
    operators: str = "+-*"
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    # 5% linear warm-up, then cosine to 10% of lr: the usual stable schedule for small GPTs.
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 250
    eval_samples: int = 512
    device: str = "cpu"
    threads: int | None = None  # None: leave torch's default

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(
                f"model must be a ModelConfig or a mapping, got {type(self.model).__name__}"
            )
        for name in ("steps", "batch_size", "eval_every", "eval_samples"):
            _check_positive_int(name, getattr(self, name))
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= self.steps:
            raise ConfigError(f"warmup_steps must be an int in [0, steps], got {short_repr(w)}")
        if _check_real("lr", self.lr) <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if _check_real("weight_decay", self.weight_decay) < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**64:
            raise ConfigError(f"seed must be an int in [0, 2**64), got {short_repr(s)}")
        if not isinstance(self.device, str) or not self.device.startswith(("cpu", "cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:n]', got {short_repr(self.device)}")
        if self.threads is not None:
            _check_positive_int("threads", self.threads)
        task = self.task()  # validates digits/operators
        need = task.prompt_len + task.max_answer_len
        if need > self.model.max_seq_len:
            raise ConfigError(
                f"the task needs {need} tokens but model.max_seq_len is {self.model.max_seq_len}"
            )
        if self.model.vocab_size < task.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({self.model.vocab_size}) must be >= the task's "
                f"{task.tokenizer.vocab_size} ids"
            )

    def task(self) -> ArithmeticTask:
        try:
            return ArithmeticTask(self.digits, self.operators)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        data = load_yaml_mapping(path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown train config keys {short_repr(unknown)}")
        return cls(**data)


@torch.no_grad()
def evaluate(
    model: SimpleTransformerModel, task: ArithmeticTask, split: str, n: int, seed: int = 1234
) -> float:
    """Greedy exact-match accuracy on ``n`` problems of ``split``."""
    problems = task.sample(split, n, seed)
    device = model.tok_emb.weight.device
    correct = 0
    for i in range(0, n, 256):
        chunk = problems[i : i + 256]
        ids = task.encode_prompts(chunk).to(device)
        out = model.generate(ids, task.max_answer_len, eos_id=task.tokenizer.EOS)
        for p, row in zip(chunk, out[:, ids.shape[1] :].cpu(), strict=True):
            correct += task.verify(task.prompt(p), task.tokenizer.decode(row))
    return correct / max(n, 1)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _plot_loss(history: list[dict], evals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_yscale("log")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(
            [e["step"] for e in evals],
            [e["val_acc"] for e in evals],
            "o-",
            c="C1",
            label="validation exact match",
        )
        ax2.set_ylabel("validation exact match")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    cfg: TrainConfig, out: str | Path, progress: bool = True, optimized: bool = False
) -> dict[str, Any]:
    """Train, evaluate and save into folder ``out``; returns the metrics dict.

    Args:
        cfg: the run's configuration.
        out: output folder (created).
        progress: show a rich progress bar.
        optimized: train the model :func:`ryzen_opt.optimize_training` returns (measured on
            the initial weights and the first batch; the random state is not consumed, so
            the run sees the same weights and data as without it).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but CUDA is not available")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)
    task = cfg.task()
    model = SimpleTransformerModel(cfg.model).to(cfg.device)
    data = task.sample("train", cfg.steps * cfg.batch_size, cfg.seed)
    opt_report = None
    if optimized:
        from ryzen_opt.training import optimize_training

        x0, y0 = task.encode_training(data[: cfg.batch_size])
        model = optimize_training(model, (x0.to(cfg.device), y0.to(cfg.device)))
        opt_report = model.optimization_report
        (out / "optimize_training.md").write_text(opt_report.to_markdown())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    history: list[dict] = []
    evals: list[dict] = []
    t0 = time.perf_counter()

    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [
        TextColumn("train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f} val {task.fields[val]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, disable=not progress, transient=False) as bar:
        job = bar.add_task("train", total=cfg.steps, loss=float("nan"), val="-")
        for step in range(cfg.steps):
            model.train()
            batch = data[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x, y = task.encode_training(batch)
            x, y = x.to(cfg.device), y.to(cfg.device)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            loss = causal_lm_loss(model, (x, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_v = loss.detach().item()
            history.append({"step": step, "loss": loss_v, "lr": _lr_at(step, cfg)})
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                acc = evaluate(model, task, "validation", cfg.eval_samples)
                evals.append({"step": step + 1, "val_acc": acc})
                bar.update(job, val=f"{acc:.3f}")
            bar.update(job, advance=1, loss=loss_v)
    train_s = time.perf_counter() - t0
    model.eval()
    metrics = {
        "val_exact_match": evals[-1]["val_acc"],
        "test_exact_match": evaluate(model, task, "test", cfg.eval_samples, seed=4321),
        "eval_samples": cfg.eval_samples,
        "train_seconds": round(train_s, 1),
        "steps": cfg.steps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "num_parameters": model.num_parameters(),
        "task": task.to_dict(),
        "optimized": optimized,
    }
    if opt_report is not None:
        metrics["optimize_training"] = {
            "summary": opt_report.summary,
            "seconds": round(opt_report.elapsed_s, 1),
            "chosen": {s.kind: s.chosen.get("train step") for s in opt_report.sites if s.chosen},
        }
    save_checkpoint(model, out / "checkpoint")
    (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (out / "loss.json").write_text(json.dumps({"history": history, "evals": evals}))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot_loss(history, evals, out / "loss.png")
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ryzen_opt.models.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="training YAML (default: built-in defaults)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--steps", type=int, help="override the config's steps")
    ap.add_argument("--device", help="override the config's device (cpu, cuda)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--optimized",
        action="store_true",
        help="train the model optimize_training() returns (fused parts where measured faster)",
    )
    args = ap.parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    if args.steps is not None or args.device is not None:
        d = cfg.to_dict()
        if args.steps is not None:
            d["steps"] = args.steps
            d["warmup_steps"] = min(d["warmup_steps"], args.steps)
        if args.device is not None:
            d["device"] = args.device
        cfg = TrainConfig(**d)
    metrics = train(cfg, args.out, progress=not args.no_progress, optimized=args.optimized)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
