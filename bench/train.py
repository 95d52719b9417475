"""Training side by side: the eager step, ``optimize_training()``'s and ``torch.compile``'s.

    python -m bench.train [--device cpu|cuda] [--models default|llama-1b,seed-gpu]
                          [--variants eager,optimized,compile] [--steps N] [--quick]
                          [--threads N] [--force chunked_lce] [--out DIR]

One process. Every variant starts from the same initial weights (one seeded model, copied)
and trains on the same batches in the same order with the same optimizer and schedule; each
step is timed on its own (CUDA synchronised), and the variants take turns within a step in
a balanced order (AB BA ..., :func:`ryzen_opt.timing._balanced_orders`) so drift and load
reach them alike. The first ``--warmup`` steps (compilation, autotuning, the allocator) are
in the loss curves but not in the timings.

* ``eager``: the model as built; the loss is :func:`ryzen_opt.training.causal_lm_loss`
  (for the seed model exactly the trainer's logits + ``F.cross_entropy``).
* ``optimized``: :func:`ryzen_opt.optimize_training` of the initial model on the first batch
  (its own cost and its report are recorded).
  With ``--force NAME`` the named candidate is installed once its gradients match, without
  the speed requirement: the run then times what the fused path does to the step even where
  the selection (a few seconds of timing on a loaded machine) rejected it.
* ``compile``: ``torch.compile`` of the model (the loss outside it, as the trainer computes
  it); its compilation is paid in the warm-up steps.

Models: ``default`` (CPU): the default trainer configuration (``configs/train_default.yaml``:
the seed model on the arithmetic task, batch 128, AdamW, warm-up + cosine schedule, gradient
clipping). ``llama-1b`` (CUDA): a transformers Llama of hidden 2048, 16 layers, 32 heads (8
for keys/values), MLP 8192, vocabulary 32000, bf16, 4 x 2048 tokens of random ids.
``seed-gpu`` (CUDA): the seed model at hidden 2048, 8 layers, 16 heads, MLP 8192,
vocabulary 32000, bf16, 4 x 2048 random tokens. ``--quick`` shrinks every model and the step
count (a test of the whole flow on the CPU).

Reported per variant: median step time with its interquartile range, tokens/s, the speed-up
over eager with a bootstrap interval, the peak memory of one step above the resident model,
optimizer state and gradients (CUDA max allocated / CPU RSS growth), the final loss and the
largest loss difference to eager at any step, and whether every step's loss is within
Liger-Kernel's convergence tolerance (fp32 atol 1e-8 / rtol 1e-5, bf16 atol 1e-3 / rtol
1e-2). Results: ``train-<model>.{json,md,png}`` in ``bench/results/<device>/`` (or
``--out``), with the command, commit, versions and the load average before and after (this
CPU is shared with other work).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import (
    RESULTS,
    ROOT,
    device_name,
    environment,
    markdown_table,
    print_table,
    where,
    write_json,
)
from ryzen_opt.timing import PeakMemory, _balanced_orders, bootstrap_ratio_ci
from ryzen_opt.training import TrainingConfig, causal_lm_loss, optimize_training
from ryzen_opt.training.families import find

LIGER_TOL = {torch.float32: (1e-8, 1e-5), torch.bfloat16: (1e-3, 1e-2)}
VARIANTS = ("eager", "optimized", "compile")


@dataclass
class Workload:
    """A model, its batches and its optimizer: what every variant trains the same way."""

    name: str
    model: torch.nn.Module
    dtype: torch.dtype
    batch: Any  # step -> batch dict
    steps: int
    make_opt: Any  # model -> optimizer
    lr_at: Any  # step -> learning rate
    clip: float | None
    tokens_per_step: int
    notes: list[str] = field(default_factory=list)


def _default_workload(steps: int | None, quick: bool, device: str) -> Workload:
    from ryzen_opt.models import SimpleTransformerModel
    from ryzen_opt.models.train import TrainConfig, _lr_at

    cfg = TrainConfig.from_yaml(ROOT / "configs" / "train_default.yaml")
    d = cfg.to_dict()
    d["steps"] = steps or (8 if quick else 200)
    d["warmup_steps"] = min(d["warmup_steps"], d["steps"])
    if quick:
        d["batch_size"] = 16
        d["model"] = {**d["model"], "embedding_dim": 64, "ff_dim": 128, "vocab_size": 256}
    cfg = TrainConfig(**d)
    torch.manual_seed(cfg.seed)
    task = cfg.task()
    model = SimpleTransformerModel(cfg.model).to(device)
    data = task.sample("train", cfg.steps * cfg.batch_size, cfg.seed)

    def batch(step):
        x, y = task.encode_training(data[step * cfg.batch_size : (step + 1) * cfg.batch_size])
        return {"input_ids": x.to(device), "labels": y.to(device)}

    def make_opt(m):
        decay = [p for n, p in m.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in m.named_parameters() if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))

    tokens = batch(0)["input_ids"].numel()
    return Workload(
        "default", model, torch.float32, batch, cfg.steps, make_opt,
        lambda s: _lr_at(s, cfg), 1.0, tokens,
        [f"trainer configuration configs/train_default.yaml, {cfg.steps} steps, batch "
         f"{cfg.batch_size}" + (" (--quick: a smaller model and batch)" if quick else "")],
    )  # fmt: skip


def _random_batches(vocab: int, batch: int, seq: int, device: str, shift: bool):
    def make(step):
        g = torch.Generator().manual_seed(1000 + step)
        seqs = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
        if shift:  # labels aligned with the positions (the seed model's convention)
            return {"input_ids": seqs[:, :-1], "labels": seqs[:, 1:].contiguous()}
        ids = seqs[:, :-1]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    return make


def _gpu_workload(name: str, steps: int | None, quick: bool, device: str) -> Workload:
    dtype = torch.float32 if quick and device == "cpu" else torch.bfloat16
    batch, seq = (2, 32) if quick else (4, 2048)
    torch.manual_seed(0)
    if name == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        size = dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
        )
        if quick:
            size = dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=256,
            )
        cfg = LlamaConfig(**size, max_position_embeddings=max(seq, 64))
        model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
        shift, vocab = False, cfg.vocab_size
    else:
        from ryzen_opt.models import ModelConfig, SimpleTransformerModel

        size = dict(vocab_size=32000, embedding_dim=2048, num_heads=16, num_layers=8, ff_dim=8192)
        if quick:
            size = dict(vocab_size=256, embedding_dim=64, num_heads=4, num_layers=2, ff_dim=128)
        model = SimpleTransformerModel(ModelConfig(**size, max_seq_len=seq)).to(device, dtype)
        shift, vocab = True, size["vocab_size"]
    n = steps or (8 if quick else 30)
    return Workload(
        name, model, dtype, _random_batches(vocab, batch, seq, device, shift), n,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4), lambda s: 1e-4, 1.0,
        batch * seq, [f"random token ids, batch {batch} x {seq}, {dtype}, AdamW lr 1e-4"],
    )  # fmt: skip


def _plain_loss(module, batch, hf: bool):
    """The original loss of a (compiled) model: what causal_lm_loss computes for eager."""
    if hf:
        return module(**batch).loss
    logits, _ = module(batch["input_ids"])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict[str, Any]:
    """Train every variant of every model side by side; the results."""
    dev = args.device
    out: dict[str, Any] = {}
    for name in args.models:
        wl = (
            _default_workload(args.steps, args.quick, dev)
            if name == "default"
            else _gpu_workload(name, args.steps, args.quick, dev)
        )
        out[name] = _run_workload(wl, args.variants, dev, args.warmup, args.quick, args.force)
    return out


def _run_workload(
    wl: Workload, variants, dev: str, warmup: int, quick: bool, force=()
) -> dict[str, Any]:
    load_before = os.getloadavg()
    init = copy.deepcopy(wl.model)
    hf = find(init)[0].__name__ == "HFCausalLM"
    models, info = {}, {}
    for v in variants:
        if v == "eager":
            models[v] = copy.deepcopy(init)
        elif v == "optimized":
            t0 = time.perf_counter()
            # --quick: 3 timing samples a side (a test of the flow, not a measurement)
            kw = dict(repeat=3, warmup=1) if quick else {}
            if force:
                kw.update(candidates=tuple(force), force=tuple(force))
            cfg = TrainingConfig(**kw)
            models[v] = optimize_training(copy.deepcopy(init), wl.batch(0), config=cfg)
            rep = models[v].optimization_report
            info[v] = {
                "seconds": time.perf_counter() - t0,
                "summary": rep.summary,
                "chosen": {s.kind: s.chosen.get("train step") for s in rep.sites if s.chosen},
                "report": rep.to_markdown(),
            }
        else:
            models[v] = copy.deepcopy(init)
    loss_fns = {}
    for v in variants:
        if v == "compile":
            compiled = torch.compile(models[v])
            loss_fns[v] = lambda b, m=compiled: _plain_loss(m, b, hf)
        else:
            loss_fns[v] = lambda b, m=models[v]: causal_lm_loss(m, b)
    opts = {v: wl.make_opt(models[v]) for v in variants}
    for m in models.values():
        m.train()
    losses = {v: [] for v in variants}
    times = {v: [] for v in variants}
    orders = _balanced_orders(len(variants))

    def step(v, i, batch):
        for g in opts[v].param_groups:
            g["lr"] = wl.lr_at(i)
        _sync(dev)
        t0 = time.perf_counter()
        loss = loss_fns[v](batch)
        opts[v].zero_grad(set_to_none=True)
        loss.backward()
        if wl.clip is not None:
            torch.nn.utils.clip_grad_norm_(models[v].parameters(), wl.clip)
        opts[v].step()
        value = loss.detach().float().item()  # the trainer's per-step sync, in both
        _sync(dev)
        return time.perf_counter() - t0, value

    for i in range(wl.steps):
        batch = wl.batch(i)
        for j in orders[i % len(orders)]:
            v = variants[j]
            dt, value = step(v, i, batch)
            losses[v].append(value)
            if i >= warmup:
                times[v].append(dt)
    peaks = {}
    for v in variants:  # one more step each, its memory measured alone
        with PeakMemory(dev, interval_s=2e-4) as mem:
            step(v, wl.steps - 1, wl.batch(wl.steps - 1))
        peaks[v] = mem.peak_bytes
    atol, rtol = LIGER_TOL[wl.dtype]
    res: dict[str, Any] = {
        "steps": wl.steps,
        "warmup_steps": warmup,
        "tokens_per_step": wl.tokens_per_step,
        "dtype": str(wl.dtype).removeprefix("torch."),
        "notes": wl.notes,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "variants": {},
    }
    base = np.asarray(losses["eager"]) if "eager" in losses else None
    for v in variants:
        t = np.asarray(times[v])
        med = float(np.median(t)) if t.size else float("nan")
        q1, q3 = np.percentile(t, [25, 75]) if t.size else (float("nan"),) * 2
        r: dict[str, Any] = {
            "step_s": med,
            "step_iqr_s": float(q3 - q1),
            "tokens_per_s": wl.tokens_per_step / med,
            "peak_step_bytes": peaks[v],
            "final_loss": losses[v][-1],
            "losses": losses[v],
            "step_samples_s": times[v],
            **info.get(v, {}),
        }
        if base is not None and t.size >= 3:
            r["speedup"] = float(np.median(times["eager"]) / med)
            r["speedup_ci"] = list(bootstrap_ratio_ci(times["eager"], times[v]))
        if base is not None:
            diff = np.abs(np.asarray(losses[v]) - base)
            r["max_loss_abs_diff"] = float(diff.max())
            r["max_loss_rel_diff"] = float((diff / np.abs(base)).max())
            r["loss_within_liger_tol"] = bool(np.all(diff <= atol + rtol * np.abs(base)))
        res["variants"][v] = r
    return res


def table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "step (IQR)", "tokens/s", "vs eager [95% CI]", "peak step MB",
            "final loss", "max |Δloss|", "loss within tol"]  # fmt: skip
    rows = []
    for v, r in res["variants"].items():
        ci = r.get("speedup_ci")
        rows.append(
            [
                v,
                f"{r['step_s'] * 1e3:.1f} ms ({r['step_iqr_s'] * 1e3:.1f})",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['speedup']:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-",
                f"{r['peak_step_bytes'] / 2**20:.1f}",
                f"{r['final_loss']:.5f}",
                f"{r['max_loss_abs_diff']:.2e}" if "max_loss_abs_diff" in r else "-",
                str(r.get("loss_within_liger_tol", "-")),
            ]
        )
    return head, rows


def plot(res: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (v, r) in enumerate(res["variants"].items()):
        a.plot(r["losses"], lw=1.2 if i == 0 else 0.9, ls="-" if i == 0 else "--", label=v)
        b.plot(
            range(res["warmup_steps"], res["warmup_steps"] + len(r["step_samples_s"])),
            np.asarray(r["step_samples_s"]) * 1e3,
            lw=0.8,
            label=v,
        )
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.set_yscale("log")
    a.legend()
    a.set_title("loss, same weights and batches")
    b.set_xlabel("step")
    b.set_ylabel("step time (ms)")
    b.legend()
    b.set_title("step time (interleaved)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--models", help="comma list: default (CPU), llama-1b, seed-gpu (CUDA)")
    ap.add_argument("--variants", help="comma list of eager,optimized,compile")
    ap.add_argument("--steps", type=int, help="training steps (default 200 CPU, 30 CUDA)")
    ap.add_argument("--warmup", type=int, help="untimed first steps (default 5; 2 quick)")
    ap.add_argument("--quick", action="store_true", help="small models, a few steps")
    ap.add_argument("--threads", type=int, help="torch threads (CPU)")
    ap.add_argument("--out", help="results folder (default bench/results/<device>)")
    ap.add_argument(
        "--force",
        default="",
        help="comma list of optimize_training candidates to install without the speed "
        "requirement (TrainingConfig.force): times a fused path even where the selection, "
        "measured on a loaded machine, rejected it; the file name and table say so",
    )
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    default_models = "default" if args.device == "cpu" else "llama-1b,seed-gpu"
    args.models = [m for m in (args.models or default_models).split(",") if m]
    for m in args.models:
        if m not in ("default", "llama-1b", "seed-gpu"):
            ap.error(f"--models: unknown model {m!r}")
    default_variants = "eager,optimized" if args.device == "cpu" else "eager,optimized,compile"
    args.variants = [v for v in (args.variants or default_variants).split(",") if v]
    if not args.variants or args.variants[0] != "eager" or set(args.variants) - set(VARIANTS):
        ap.error(f"--variants must start with eager and be drawn from {VARIANTS}")
    if args.steps is not None and args.steps < 3:
        ap.error("--steps must be >= 3")
    args.force = [f for f in args.force.split(",") if f]
    try:
        TrainingConfig(force=tuple(args.force))
    except ValueError as e:
        ap.error(f"--force: {e}")
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    if args.steps is not None and args.warmup >= args.steps:
        ap.error("--warmup must be below --steps")
    env = environment(args.device)
    outdir = Path(args.out) if args.out else RESULTS / device_name(args.device)
    outdir.mkdir(parents=True, exist_ok=True)
    results = run(args)
    for name, res in results.items():
        if args.force:
            res["notes"].append(
                f"forced: {', '.join(args.force)} installed without the speed requirement "
                "(its gradients were checked); the table measures what it does to the step"
            )
        head, rows = table(res)
        title = f"bench.train {name} on {where(env)}"
        print_table(title, head, rows)
        stem = f"train-{name}" + ("-quick" if args.quick else "")
        stem += "".join(f"-force-{f}" for f in args.force)
        stem += f"-threads{args.threads}" if args.threads else ""
        write_json(outdir / f"{stem}.json", {"environment": env, "model": name, **res})
        plot(res, outdir / f"{stem}.png", title)
        md = [f"# {title}", "", f"`{env['command']}` at commit {env['commit']}; torch "
              f"{env['versions']['torch']}, transformers {env['versions']['transformers']}, "
              f"{env['torch_threads']} threads. Load average before/after: "
              f"{res['loadavg_before'][0]:.2f} / {res['loadavg_after'][0]:.2f} (a shared "
              "machine: other work ran during the measurement).", ""]  # fmt: skip
        md += [f"- {n}" for n in res["notes"]] + ["", markdown_table(head, rows)]
        opt = res["variants"].get("optimized")
        if opt:
            md += [f"optimize_training(): {opt['summary']}", "", opt["report"]]
        (outdir / f"{stem}.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
