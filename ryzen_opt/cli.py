"""``ryzen-opt`` command line: one subcommand per workflow.

    ryzen-opt export --checkpoint checkpoints/default --out model.onnx
    ryzen-opt compress --checkpoint checkpoints/default --methods int8_dynamic,int4_weight_only
        --max-accuracy-drop 1 --out compressed.onnx --json out/compress.json   (one line)
    ryzen-opt serve --port 8000 --adapters checkpoints/lora_mul2      (HTTP API, 'serve' extra)

Exit status: 0 done, 2 a usage error (bad option value, an --out that is a folder or an
existing file without --force), 1 the command failed on its input (a corrupt checkpoint).
Errors are one line on stderr, naming the option.

A new workflow adds one ``_add_<name>`` function that registers its subparser and sets
``func``; :func:`main` needs no change.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path


class UsageError(ValueError):
    """A bad option value found after parsing (exit status 2)."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def _int_list(text: str) -> tuple[int, ...]:
    parts = [t.strip() for t in text.split(",")]
    if not parts or any(not t.isdigit() or int(t) < 1 for t in parts):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 1 such as 1,64, got {text!r}"
        )
    return tuple(int(t) for t in parts)


def _points(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a number of points >= 0, got {text!r}")
    return v


def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 <= v < 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return v


def _opset(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 18:
        raise argparse.ArgumentTypeError(f"expected an ONNX opset >= 18, got {text!r}")
    return v


def _out_path(path: str, force: bool, option: str = "--out") -> Path:
    from ryzen_opt.compress.export import check_output_path

    try:
        return check_output_path(path, option, force=force)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to an ONNX decoder with KV cache")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument(
        "--no-kv-cache", action="store_true", help="export a full-sequence model (logits only)"
    )
    p.add_argument(
        "--opset", type=_opset, default=None, help="ONNX opset >= 18 (default: the exporter's)"
    )
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    out = _out_path(args.out, args.force)  # before the slow work
    from ryzen_opt.compress import export_onnx
    from ryzen_opt.models import load_checkpoint

    model = load_checkpoint(args.checkpoint)
    path = export_onnx(model, out, with_kv_cache=not args.no_kv_cache, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _add_compress(sub) -> None:
    from ryzen_opt.compress.compressor import CompressConfig

    d = CompressConfig()
    p = sub.add_parser("compress", help="build compressed artifacts and judge them vs fp32")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder")
    p.add_argument(
        "--methods",
        default="int8_dynamic,int4_weight_only",
        help="comma-separated method names (see SemanticCompressor)",
    )
    p.add_argument("--digits", type=int, default=None, help="task digits (default: checkpoint's)")
    p.add_argument("--operators", default=None, help="task operators (default: checkpoint's)")
    p.add_argument(
        "--max-accuracy-drop",
        type=_points,
        default=None,
        help="accuracy budget in points; picks the best artifact within it and writes it to --out",
    )
    p.add_argument("--prefer", choices=("size", "speed"), default="size")
    p.add_argument(
        "--out",
        default=None,
        help="where the chosen artifact goes (default: compressed.onnx in the "
        "working directory); needs --max-accuracy-drop",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--eval-samples", type=_positive_int, default=d.eval_samples)
    p.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=",".join(map(str, d.batch_sizes)),
        help="comma-separated timing batch sizes (default: %(default)s)",
    )
    p.add_argument(
        "--repeat",
        type=_positive_int,
        default=d.repeat,
        help="timing samples per side, >= 3 (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=d.threads,
        help="ONNX Runtime intra-op threads (default: %(default)s)",
    )
    p.add_argument("--ratio", type=_ratio, default=0.3, help="pruning compression_ratio")
    p.add_argument("--finetune-steps", type=int, default=0, help="recovery fine-tune steps")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep every artifact in this folder (default: a temporary folder, deleted at the end)",
    )
    p.add_argument("--json", default=None, help="write the report here (JSON)")
    p.set_defaults(func=_run_compress)


def _task(checkpoint: Path, digits, operators):
    import yaml

    from ryzen_opt.models import ArithmeticTask

    found: dict = {}
    for cand in (checkpoint / "train_config.yaml", checkpoint.parent / "train_config.yaml"):
        if cand.is_file():
            found = yaml.safe_load(cand.read_text()) or {}
            break
    return ArithmeticTask(
        digits if digits is not None else int(found.get("digits", 3)),
        operators if operators is not None else found.get("operators", "+"),
    )


def _run_compress(args: argparse.Namespace) -> int:
    from ryzen_opt.compress.compressor import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise UsageError(f"--methods: unknown {bad or 'empty list'}; known: {', '.join(METHODS)}")
    if args.repeat < 3:
        raise UsageError(f"--repeat must be >= 3, got {args.repeat}")
    if args.json is not None:  # the report is written last: check its path before the work
        _out_path(args.json, True, "--json")
    if args.max_accuracy_drop is None and args.out is not None:
        raise UsageError("--out needs --max-accuracy-drop: without a budget nothing is chosen")
    out = None
    if args.max_accuracy_drop is not None:
        out = _out_path("compressed.onnx" if args.out is None else args.out, args.force)
        out = out.absolute()  # the report and the message name it wherever one reads them
    if args.workdir is not None:
        return _compress(args, methods, args.workdir, out)
    with tempfile.TemporaryDirectory(prefix="ryzen_opt_compress_") as tmp:
        return _compress(args, methods, Path(tmp), out)


def _compress(args: argparse.Namespace, methods: list[str], workdir: Path, out: Path | None) -> int:
    from rich.console import Console

    from ryzen_opt.compress import CompressConfig, PruneConfig, SemanticCompressor
    from ryzen_opt.compress.export import atomic_output, set_metadata
    from ryzen_opt.models import load_checkpoint

    model = load_checkpoint(args.checkpoint)
    task = _task(args.checkpoint, args.digits, args.operators)
    cfg = CompressConfig(
        eval_samples=args.eval_samples,
        threads=args.threads,
        repeat=args.repeat,
        batch_sizes=args.batch_sizes,
        prune=PruneConfig(compression_ratio=args.ratio, finetune_steps=args.finetune_steps),
    )
    report = SemanticCompressor(model, task, cfg, workdir=workdir).run(
        methods, max_accuracy_drop=args.max_accuracy_drop, prefer=args.prefer
    )
    console = Console(width=200)
    console.print(report.table())
    if report.chosen is not None and out is not None:
        chosen = report.result(report.chosen)
        with atomic_output(out) as tmp:
            shutil.copyfile(chosen.path, tmp)
            set_metadata(tmp, {"ryzen_opt.method": chosen.method})
        if args.workdir is None:  # the other artifacts go with the temporary folder
            for r in report.results:
                r.path = None
        chosen.path = str(out)
        console.print(f"chosen: {chosen.method} -> wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    elif args.workdir is None:
        for r in report.results:
            r.path = None
    if args.json is not None:
        console.print(f"wrote {report.to_json(args.json)}")
    return 0


INSTANT_FACTORY = "ryzen_opt.serve.instant:text_to_lora"
INSTANT_EXPERTS = "ryzen_opt.serve.instant:svf_experts"
SERVE_CHECKPOINT, SERVE_ADAPTERS = "checkpoints/default", "checkpoints/lora_mul2"
INSTANT_CHECKPOINT, INSTANT_ADAPTERS = "checkpoints/instant/base", "checkpoints/instant/library"


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="the HTTP API: generate adapters, generate text (needs the 'serve' extra)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only; the API has no "
        "authentication)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0 for a free one")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help=f"base model folder (default: {SERVE_CHECKPOINT}, with --instant "
        f"{INSTANT_CHECKPOINT}: the base the instant adapters were trained over)",
    )
    p.add_argument(
        "--adapters",
        nargs="*",
        default=None,
        metavar="[ID=]FOLDER",
        help="PEFT-format adapter folders to serve, or folders of them; the id is the folder's "
        f"name unless given as ID=FOLDER (default: {SERVE_ADAPTERS}, with --instant "
        f"{INSTANT_ADAPTERS}: the task-LoRA library)",
    )
    p.add_argument(
        "--adapter-factory",
        default=None,
        metavar="MODULE:NAME",
        help="a callable NAME(registry, workdir) in MODULE returning the adapter generator "
        "factory(description, seed) -> folder; without it POST /adapters/generate answers 503",
    )
    p.add_argument(
        "--skill-router",
        default=None,
        metavar="MODULE:NAME",
        help="a callable NAME(registry, workdir) returning router(prompt) -> adapter id or None, "
        'for adapter="auto"; without it such requests answer 503',
    )
    p.add_argument(
        "--experts",
        default=None,
        metavar="MODULE:NAME",
        help="a callable NAME(registry, workdir) returning weight experts (identify(prompt), "
        'applied(name)) for adapter="auto", instead of --skill-router',
    )
    p.add_argument(
        "--instant",
        action="store_true",
        help="the committed instant adapters: --adapter-factory "
        f"{INSTANT_FACTORY} (Text-to-LoRA) and --experts {INSTANT_EXPERTS} (SVF)",
    )
    p.add_argument("--max-resident", type=_positive_int, default=4, help="adapters loaded at once")
    p.add_argument("--merged", action="store_true", help="serve adapters merged into the weights")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        # 1: requests run one at a time at batch 1, where a second OpenMP thread has little to
        # split. On a shared 2-core machine (load average 8) a 16-token greedy generate of
        # checkpoints/default took 4.5 ms median with 1 thread and 420 ms with 2 (barrier
        # stalls, in one interleaved run); bench.serve --quick throughput was within its noise
        # either way (61, 63, 42 requests/s with 1 thread; 86, 38, 42 with 2).
        help="torch threads of the model (default: %(default)s)",
    )
    p.set_defaults(func=_run_serve)


def _adapter_folders(specs: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        folder = Path(path if sep else spec)
        if not folder.is_dir():
            raise UsageError(f"--adapters: {str(folder)!r} is not a folder")
        if (folder / "adapter_config.json").is_file():
            found = {name if sep else folder.name: folder}
        elif sep:
            raise UsageError(f"--adapters: {spec!r}: {str(folder)!r} holds no adapter_config.json")
        else:
            found = {
                d.name: d for d in sorted(folder.iterdir()) if (d / "adapter_config.json").is_file()
            }
            if not found:
                raise UsageError(f"--adapters: {str(folder)!r} holds no PEFT-format adapter")
        for k, v in found.items():
            if k in out:
                raise UsageError(f"--adapters: id {k!r} given twice ({out[k]}, {v})")
            out[k] = v
    return out


def _load_object(spec: str, option: str):
    import importlib

    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UsageError(f"{option}: expected MODULE:NAME, got {spec!r}")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"{option}: cannot load {spec!r}: {e}") from None
    if not callable(obj):
        raise UsageError(f"{option}: {spec!r} is not callable")
    return obj


def build_serve_app(args: argparse.Namespace, workdir: Path):
    """The app ``ryzen-opt serve`` runs, from its parsed arguments (also used by tests).

    Args:
        args: the ``serve`` subcommand's arguments.
        workdir: a folder the adapter generator and router builders may write into.

    Returns:
        ``(app, adapter ids)``.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(
            f"serve needs the 'serve' extra (pip install 'ryzen-opt[serve]'): {e}"
        ) from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    instant = getattr(args, "instant", False)
    if getattr(args, "checkpoint", None) is None:
        args.checkpoint = Path(INSTANT_CHECKPOINT if instant else SERVE_CHECKPOINT)
    if getattr(args, "adapters", None) is None:
        args.adapters = [INSTANT_ADAPTERS if instant else SERVE_ADAPTERS]
    folders = _adapter_folders(args.adapters)
    if instant:
        if args.adapter_factory or getattr(args, "experts", None):
            raise UsageError(
                "--instant names --adapter-factory and --experts: give one or the other"
            )
        args.adapter_factory, args.experts = INSTANT_FACTORY, INSTANT_EXPERTS
    if getattr(args, "experts", None) and args.skill_router:
        raise UsageError('--experts and --skill-router both choose for adapter="auto": give one')
    factory = router = experts = None
    if args.adapter_factory:
        factory = _load_object(args.adapter_factory, "--adapter-factory")
    if args.skill_router:
        router = _load_object(args.skill_router, "--skill-router")
    if getattr(args, "experts", None):
        experts = _load_object(args.experts, "--experts")
    import torch

    from ryzen_opt.adapters import AdapterRegistry
    from ryzen_opt.models import load_checkpoint
    from ryzen_opt.models.tasks import CharTokenizer
    from ryzen_opt.serve import create_app

    torch.set_num_threads(args.threads)
    registry = AdapterRegistry(
        load_checkpoint(args.checkpoint), max_resident=args.max_resident, merged=args.merged
    )
    app = create_app(
        registry,
        CharTokenizer(),
        adapter_factory=None if factory is None else factory(registry, workdir),
        skill_router=None if router is None else router(registry, workdir),
        experts=None if experts is None else experts(registry, workdir),
        adapters=folders,
    )
    return app, list(folders)


def _listen_socket(host: str, port: int):
    """A TCP socket bound to ``(host, port)`` for uvicorn (port 0: a free one)."""
    import socket

    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say TCP; without it
    # a keep-alive client waited ~40 ms per response (Nagle against its delayed ACK).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"--host/--port: cannot listen on {host}:{port}: {e}") from None
    return sock


def _run_serve(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="ryzen_opt_serve_") as tmp:
        app, ids = build_serve_app(args, Path(tmp))
        import uvicorn

        sock = _listen_socket(args.host, args.port)
        host, port = sock.getsockname()[:2]
        print(
            f"serving {args.checkpoint} on http://{host}:{port} (adapters: "
            f"{', '.join(ids) or 'none'}; adapter generator: "
            f"{args.adapter_factory or 'none'}; skill router: "
            f"{args.skill_router or args.experts or 'none'})",
            flush=True,
        )
        try:
            uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shut down cleanly first, then re-raises Ctrl-C
            print("stopped", flush=True)
    return 0


_COMMANDS: tuple[Callable, ...] = (_add_export, _add_compress, _add_serve)


def build_parser() -> argparse.ArgumentParser:
    """The ``ryzen-opt`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="ryzen-opt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
        input. Errors are one line on stderr that names the option or argument.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:  # argparse printed usage and the error (or --help)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except UsageError as e:
        _error(args.command, e)
        return 2
    except (ValueError, TypeError, OSError) as e:
        _error(args.command, e)
        return 1


def _error(command: str, e: BaseException) -> None:
    text = " ".join(str(e).split())  # one line, even for a multi-line library message
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{text} ({e.filename})"
    print(f"ryzen-opt {command}: error: {text}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
