"""``ryzen-opt`` command line: one subcommand per workflow.

    ryzen-opt export --checkpoint checkpoints/default --out model.onnx
    ryzen-opt compress --checkpoint checkpoints/default --methods int8_dynamic,int4_weight_only
        --max-accuracy-drop 1 --workdir out/compress --json out/compress.json   (one line)

A new workflow adds one ``_add_<name>`` function that registers its subparser and sets
``func``; :func:`main` needs no change.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to an ONNX decoder with KV cache")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder")
    p.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="export a full-sequence model (logits only)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: exporter's)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from ryzen_opt.compress import export_onnx
    from ryzen_opt.models import load_checkpoint

    model = load_checkpoint(args.checkpoint)
    path = export_onnx(model, args.out, with_kv_cache=not args.no_kv_cache, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _add_compress(sub) -> None:
    from ryzen_opt.compress import METHODS

    p = sub.add_parser("compress", help="build compressed artifacts and judge them vs fp32")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder")
    p.add_argument("--methods", default="int8_dynamic,int4_weight_only",
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--digits", type=int, default=None, help="task digits (default: checkpoint's)")
    p.add_argument("--operators", default=None, help="task operators (default: checkpoint's)")
    p.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="accuracy budget in points; picks the best artifact within it")
    p.add_argument("--prefer", choices=("size", "speed"), default="size")
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--batch-sizes", default="1,64", help="comma-separated timing batch sizes")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.3, help="pruning compression_ratio")
    p.add_argument("--finetune-steps", type=int, default=0, help="recovery fine-tune steps")
    p.add_argument("--workdir", type=Path, default=None, help="folder for the artifacts")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.set_defaults(func=_run_compress)


def _task(checkpoint: Path, digits, operators):
    import yaml

    from ryzen_opt.models import ArithmeticTask

    found: dict = {}
    for cand in (checkpoint / "train_config.yaml", checkpoint.parent / "train_config.yaml"):
        if cand.is_file():
            found = yaml.safe_load(cand.read_text()) or {}
            break
    return ArithmeticTask(digits if digits is not None else int(found.get("digits", 3)),
                          operators if operators is not None else found.get("operators", "+"))


def _run_compress(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ryzen_opt.compress import CompressConfig, PruneConfig, SemanticCompressor
    from ryzen_opt.models import load_checkpoint

    model = load_checkpoint(args.checkpoint)
    task = _task(args.checkpoint, args.digits, args.operators)
    cfg = CompressConfig(
        eval_samples=args.eval_samples, threads=args.threads, repeat=args.repeat,
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        prune=PruneConfig(compression_ratio=args.ratio, finetune_steps=args.finetune_steps),
    )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    report = SemanticCompressor(model, task, cfg, workdir=args.workdir).run(
        methods, max_accuracy_drop=args.max_accuracy_drop, prefer=args.prefer)
    console = Console(width=200)
    console.print(report.table())
    if report.chosen is not None:
        chosen = report.result(report.chosen)
        console.print(f"chosen: {chosen.method} -> {chosen.path}")
    if args.json is not None:
        console.print(f"wrote {report.to_json(args.json)}")
    return 0


_COMMANDS: tuple[Callable, ...] = (_add_export, _add_compress)


def build_parser() -> argparse.ArgumentParser:
    """The ``ryzen-opt`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="ryzen-opt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ryzen-opt`` console script.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for usage errors, 1 when the command failed on its
        input (the message names the argument).
    """
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"ryzen-opt {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
