"""Compression benchmark: every SemanticCompressor artifact against the fp32 ONNX export.

Run from the repository root::

    python -m bench.compress                      # the default checkpoint, all methods
    python -m bench.compress --quick              # fewer samples, for a smoke run

prints a rich table and writes ``compress.json`` (every figure, the command, versions, thread
count) and ``compress.png`` (size vs decode speed-up, labelled with accuracy) into
``bench/results/cpu/``. The issue's goals are checked against the measured figures and the
verdicts (met or missed) are part of the JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from ryzen_opt.compress import METHODS, CompressConfig, PruneConfig, SemanticCompressor
from ryzen_opt.compress.compressor import CompressionReport
from ryzen_opt.cpu_info import cpu_isa
from ryzen_opt.models import ArithmeticTask, load_checkpoint

DEFAULT_CHECKPOINT = Path("checkpoints/default")
OUT = Path("bench/results/cpu")


def task_for(checkpoint: Path, digits: int | None, operators: str | None) -> ArithmeticTask:
    """The checkpoint's task: from a ``train_config.yaml`` beside or above it, else defaults."""
    found: dict[str, Any] = {}
    for cand in (checkpoint / "train_config.yaml", checkpoint.parent / "train_config.yaml"):
        if cand.is_file():
            found = yaml.safe_load(cand.read_text()) or {}
            break
    return ArithmeticTask(digits if digits is not None else int(found.get("digits", 3)),
                          operators if operators is not None else found.get("operators", "+"))


def goals(report: CompressionReport) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was met."""
    big = max(report.config["batch_sizes"])
    one = min(report.config["batch_sizes"])
    out: list[dict[str, Any]] = []

    def add(method: str, what: str, value: float, target: str, ok: bool) -> None:
        out.append({"method": method, "goal": what, "target": target, "measured": value,
                    "met": bool(ok)})

    names = {r.method for r in report.results}
    if "int8_dynamic" in names:
        r = report.result("int8_dynamic")
        for b in sorted({one, big}):
            s = r.speedup("decode", b)
            add(r.method, f"decode speed-up, batch {b}", s, ">= 2.0x", s >= 2.0)
        add(r.method, "file size ratio", r.size_ratio, "<= 0.3", r.size_ratio <= 0.3)
        add(r.method, "accuracy drop (points)", r.accuracy_drop, "<= 1", r.accuracy_drop <= 1)
    if "int4_weight_only" in names:
        r = report.result("int4_weight_only")
        add(r.method, "file size ratio", r.size_ratio, "<= 0.2", r.size_ratio <= 0.2)
        add(r.method, "accuracy drop (points)", r.accuracy_drop, "reported", True)
    if "structured_prune" in names:
        r = report.result("structured_prune")
        for b in sorted({one, big}):
            for ph in ("prefill", "decode"):
                s = r.speedup(ph, b)
                add(r.method, f"{ph} speed-up, batch {b}", s, ">= 1.3x", s >= 1.3)
        add(r.method, "accuracy drop (points)", r.accuracy_drop, "<= 2", r.accuracy_drop <= 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compress", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--digits", type=int, help="task digits (default: the checkpoint's)")
    ap.add_argument("--operators", help="task operators (default: the checkpoint's)")
    ap.add_argument("--methods", default=",".join(METHODS[1:]),
                    help="comma-separated methods (fp32 is always run first)")
    ap.add_argument("--eval-samples", type=int, default=512)
    ap.add_argument("--batch-sizes", default="1,64")
    # Default: CompressConfig's own timing settings (1 intra-op thread, 101 samples, which
    # kept the fp32-vs-fp32 row within +-5%); these override them.
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ratio", type=float, default=0.3, help="pruning compression_ratio")
    ap.add_argument("--finetune-steps", type=int, default=400)
    ap.add_argument("--max-accuracy-drop", type=float, default=1.0)
    ap.add_argument("--prefer", choices=("size", "speed"), default="size")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the artifacts here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 128 samples, repeat 7")
    args = ap.parse_args(argv)
    if args.quick:
        args.eval_samples, args.repeat, args.finetune_steps = 128, 7, 50

    timing_kw = {k: v for k, v in (("threads", args.threads), ("repeat", args.repeat)) if v}
    cfg = CompressConfig(
        eval_samples=args.eval_samples,
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        prune=PruneConfig(compression_ratio=args.ratio, finetune_steps=args.finetune_steps),
        **timing_kw,
    )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_checkpoint(args.checkpoint)
    task = task_for(args.checkpoint, args.digits, args.operators)
    console = Console(width=220)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    t0 = time.perf_counter()
    comp = SemanticCompressor(model, task, cfg, workdir=args.workdir)
    report = comp.run(
        methods, max_accuracy_drop=args.max_accuracy_drop, prefer=args.prefer,
        on_result=lambda r: console.print(
            f"[dim]{r.method}: {r.size_bytes / 1e6:.2f} MB, acc {100 * r.accuracy:.1f}%, "
            f"built in {r.build_seconds:.1f}s[/dim]"),
    )
    console.print(report.table())
    console.print(f"CPU ISA: {cpu_isa()}")
    console.print(f"chosen within {args.max_accuracy_drop} points ({args.prefer}): "
                  f"[bold]{report.chosen}[/bold]; PyTorch fp32 accuracy "
                  f"{100 * report.pytorch_accuracy:.1f}%")
    checks = goals(report)
    for g in checks:
        mark = "[green]met[/green]" if g["met"] else "[red]missed[/red]"
        console.print(f"  {g['method']}: {g['goal']} = {g['measured']:.3f} "
                      f"(target {g['target']}): {mark}")
    data = report.to_dict()
    data["goals"] = checks
    data["cpu_isa"] = cpu_isa()
    data["command"] = "python -m bench.compress " + " ".join(sys.argv[1:] if argv is None
                                                              else argv)
    data["checkpoint"] = str(args.checkpoint)
    data["wall_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    import json

    (args.out / "compress.json").write_text(json.dumps(data, indent=2))
    report.plot(args.out / "compress.png")
    console.print(f"wrote {args.out / 'compress.json'} and {args.out / 'compress.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
