"""The edge generate loop side by side: ``OnnxGenerator`` vs onnxruntime-genai, same model.

    python -m bench.edge [--checkpoint checkpoints/default] [--new-tokens 64] [--threads 1]

Exports the checkpoint (or, without one, a seeded default-config model) once, writes the
``genai_config.json`` onnxruntime-genai needs next to it, and times greedy generation of the
same prompts with both loops in one process, interleaved (``ryzen_opt.timing.compare``, ABBA
order), with the same ONNX Runtime library and thread count. Reports tokens/s, the ratio with
its bootstrap interval, and whether the tokens are equal. Writes ``bench/results/cpu/edge.md``
and ``edge.json`` (versions, thread count, command). onnxruntime-genai is optional
(``pip install onnxruntime-genai`` or the ``genai`` extra): without it the genai column is
skipped with a message.

How our exported decoder maps onto onnxruntime-genai (no change to the model was needed):
type ``llama`` (genai's generic decoder-only loop); inputs ``input_ids``, ``position_ids``,
``past_key_%d`` / ``past_value_%d`` and outputs ``logits``, ``present_key_%d`` /
``present_value_%d``, past in ``(batch, heads, past, head_dim)``, genai's default layout;
no ``attention_mask`` input (genai feeds it only when the graph has one); and
``past_present_share_buffer: false``, because our graph concatenates past and new keys
(present is ``past + seq`` long) rather than writing into a ``max_length`` buffer.
genai insists on an ``eos_token_id`` inside the vocabulary, while the comparison runs every
row the full length: it gets an id the greedy output never contains (checked).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS, ROOT, environment, markdown_table, print_table, write_json
from ryzen_opt.compress import OnnxGenerator, export_onnx
from ryzen_opt.models import ModelConfig, SimpleTransformerModel, load_checkpoint
from ryzen_opt.timing import compare

try:
    import onnxruntime_genai as og
except ImportError:  # optional: the genai column is skipped
    og = None


def load_model(checkpoint: Path | None, seed: int) -> tuple[SimpleTransformerModel, str]:
    """The checkpoint's model, or a seeded default-config one when there is no checkpoint."""
    if checkpoint is not None and (checkpoint / "config.yaml").is_file():
        shown = checkpoint.resolve()
        shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
        return load_checkpoint(checkpoint).eval(), str(shown)
    torch.manual_seed(seed)
    return SimpleTransformerModel(ModelConfig()).eval(), f"untrained ModelConfig(), seed {seed}"


def genai_config(cfg: ModelConfig, filename: str, threads: int, eos_id: int) -> dict[str, Any]:
    """The ``genai_config.json`` that lets onnxruntime-genai run ``export_onnx``'s decoder."""
    head_dim = cfg.embedding_dim // cfg.num_heads
    return {
        "model": {
            "type": "llama",
            "context_length": cfg.max_seq_len,
            "vocab_size": cfg.vocab_size,
            "bos_token_id": eos_id,
            "eos_token_id": eos_id,
            "pad_token_id": eos_id,
            "decoder": {
                "filename": filename,
                "session_options": {
                    "log_id": "bench.edge",
                    "intra_op_num_threads": threads,
                    "inter_op_num_threads": 1,
                    "provider_options": [],
                },
                "head_size": head_dim,
                "hidden_size": cfg.embedding_dim,
                "num_attention_heads": cfg.num_heads,
                "num_key_value_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_%d",
                    "past_value_names": "past_value_%d",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present_key_%d",
                    "present_value_names": "present_value_%d",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": cfg.max_seq_len,
            "min_length": 0,
            "past_present_share_buffer": False,
        },
    }


def genai_generate(model: Any, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy ``(batch, seq + new_tokens)`` ids from onnxruntime-genai's own loop."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + new_tokens, batch_size=prompt.shape[0])
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    return np.stack([np.asarray(gen.get_sequence(i)) for i in range(prompt.shape[0])])


def unused_id(tokens: np.ndarray, vocab_size: int) -> int:
    """The highest id that ``tokens`` do not contain."""
    present = set(np.unique(tokens).tolist())
    return next(i for i in range(vocab_size - 1, -1, -1) if i not in present)


def _loaded_ort_library() -> str:
    """The libonnxruntime file mapped into this process (genai links the onnxruntime package's)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return "unknown"
    libs = {line.split()[-1] for line in maps if "libonnxruntime.so" in line}
    return ", ".join(sorted(libs)) or "unknown"


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    model, source = load_model(args.checkpoint, args.seed)
    cfg = model.config
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        raise SystemExit(f"--prompt-len + --new-tokens must be <= max_seq_len={cfg.max_seq_len}")
    rng = np.random.default_rng(args.seed)
    tmp = tempfile.TemporaryDirectory(prefix="bench-edge-")
    folder = Path(tmp.name)
    path = export_onnx(model, folder / "model.onnx")
    ours = OnnxGenerator(path, threads=args.threads)
    genai_model = None
    if og is None:
        print(
            "onnxruntime-genai is not installed: skipping its column "
            "(pip install onnxruntime-genai)",
            file=sys.stderr,
        )
    rows, cells = [], []
    for batch in args.batch_sizes:
        # The arithmetic task's character ids (3..16), which the default checkpoint was
        # trained on; never zeros.
        prompt = rng.integers(3, min(17, cfg.vocab_size), (batch, args.prompt_len), dtype=np.int64)
        want = ours.generate(prompt, args.new_tokens)
        with torch.no_grad():
            torch_ids = model.generate(torch.from_numpy(prompt), args.new_tokens).numpy()
        cell: dict[str, Any] = {
            "batch": batch,
            "ours_equal_torch": bool((want == torch_ids).all()),
        }
        tokens = batch * args.new_tokens
        if og is not None:
            eos = unused_id(want, cfg.vocab_size)
            (folder / "genai_config.json").write_text(
                json.dumps(genai_config(cfg, path.name, args.threads, eos), indent=1)
            )
            genai_model = og.Model(str(folder))
            got = genai_generate(genai_model, prompt, args.new_tokens)
            cell["genai_equal_ours"] = bool(got.shape == want.shape and (got == want).all())
            cell["genai_eos_id"] = eos
            cmp = compare(
                lambda p=prompt, m=genai_model: genai_generate(m, p, args.new_tokens),
                lambda p=prompt: ours.generate(p, args.new_tokens),
                repeat=args.repeat,
                warmup=2,
            )
            cell["comparison"] = cmp.to_dict()
            t_ours, t_genai = cmp.candidate.median, cmp.baseline.median
            rows.append(
                [
                    batch,
                    f"{tokens / t_ours:.0f}",
                    f"{tokens / t_genai:.0f}",
                    f"{cmp.speedup:.2f}x [{cmp.ci_low:.2f}, {cmp.ci_high:.2f}]",
                    "yes" if cell["genai_equal_ours"] else "NO",
                    "yes" if cell["ours_equal_torch"] else "NO",
                    cmp.candidate.n,
                ]
            )
        else:
            from ryzen_opt.timing import time_fn

            t = time_fn(
                lambda p=prompt: ours.generate(p, args.new_tokens), repeat=args.repeat, warmup=2
            )
            cell["ours"] = t.to_dict()
            rows.append(
                [
                    batch,
                    f"{tokens / t.median:.0f}",
                    "not installed",
                    "-",
                    "-",
                    "yes" if cell["ours_equal_torch"] else "NO",
                    t.n,
                ]
            )
        cells.append(cell)
    versions = environment("cpu")
    versions["versions"]["onnxruntime_genai"] = (
        importlib.metadata.version("onnxruntime-genai") if og is not None else "not installed"
    )
    return {
        "env": versions,
        "model": source,
        "config": {
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "repeat": args.repeat,
            "greedy": True,
        },
        "ort_library": _loaded_ort_library(),
        # Other work on the machine widens the intervals; recorded so a reader can tell.
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "genai_config": (
            json.loads((folder / "genai_config.json").read_text()) if og is not None else None
        ),
        "cells": cells,
        "rows": rows,
    }


HEADERS = [
    "batch",
    "OnnxGenerator tok/s",
    "onnxruntime-genai tok/s",
    "ratio (ours/genai) [95% CI]",
    "tokens equal",
    "equal to torch",
    "n",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.edge", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "default")
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    # 1 thread: the 2-core benchmark machine is shared, and one thread per loop is what a
    # small edge core runs; both loops get the same count.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu" / "edge")
    args = ap.parse_args(argv)
    result = run(args)
    title = (
        f"greedy generation, {args.prompt_len}-token prompt + {args.new_tokens} new, "
        f"{args.threads} thread(s), {result['model']}"
    )
    print_table(title, HEADERS, result["rows"])
    env = result["env"]
    write_json(args.out.with_suffix(".json"), result)
    md = [
        f"# {title}\n",
        "Both loops run the same exported decoder with the same ONNX Runtime library "
        f"({Path(result['ort_library']).name}), timed interleaved in one process (ABBA, median "
        "of n samples). ratio > 1: OnnxGenerator is faster. 1-minute load average "
        f"before/after: {result['load_average_1m'][0]:.1f}/{result['load_average_1m'][1]:.1f} "
        f"on {env['cores']} cores.\n",
        markdown_table(HEADERS, result["rows"]),
        f"\nCommand: `{env['command']}` (commit {env['commit']}); CPU {env['cpu']}, "
        f"{env['cores']} cores; versions: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + "\n",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
