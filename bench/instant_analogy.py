"""Held-out tasks by weight arithmetic on the library LoRAs: does the family compose linearly?

    python -m bench.instant_analogy [--library DIR] [--checkpoint DIR] [-n 512] [-o FILE]

Text-to-LoRA is asked to write an adapter for a held-out (operator, format) pair, subtraction
written reversed, from its description alone. If the library's adapters composed linearly in
weight space, a hypernetwork could learn that composition from the seen tasks. This checks
it directly, with no hypernetwork in the way: for each held-out task it merges into the base
model a weighted sum of the library's merged LoRA updates ``scaling * B @ A`` and measures
exact match on the held-out task's test problems (the problems of ``bench.instant_adapters``,
``EVAL_SEED``):

* the operator's LoRA alone (``sub2``), the format's alone (``add2_rev``), their sum, and the
  task analogy ``sub2 + add2_rev - add2`` (subtract, and swap the plain sum for the reversed
  one); the same at three digits, and the 3-digit operator with the 2-digit format pair
  (the 3-digit reversed-sum LoRA hardly learned its task).

Prints one line a combination; writes JSON and a Markdown table (``-o``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

from bench.common import environment
from ryzen_opt.adapters.instant import EVAL_SEED, library_weights
from ryzen_opt.adapters.tasks import HELD_OUT, SEEN, get_spec
from ryzen_opt.models import load_checkpoint
from ryzen_opt.models.train import evaluate

# held-out task -> [(label, {library task: weight})]
COMBOS: dict[str, list[tuple[str, dict[str, float]]]] = {
    "sub2_rev": [
        ("operator", {"sub2": 1.0}),
        ("format", {"add2_rev": 1.0}),
        ("operator + format", {"sub2": 1.0, "add2_rev": 1.0}),
        ("analogy", {"sub2": 1.0, "add2_rev": 1.0, "add2": -1.0}),
    ],
    "sub3_rev": [
        ("operator", {"sub3": 1.0}),
        ("format", {"add3_rev": 1.0}),
        ("operator + format", {"sub3": 1.0, "add3_rev": 1.0}),
        ("analogy", {"sub3": 1.0, "add3_rev": 1.0, "add3": -1.0}),
        ("analogy, 2-digit format pair", {"sub3": 1.0, "add2_rev": 1.0, "add2": -1.0}),
    ],
}


def merged_model(base, deltas: dict[str, dict[str, torch.Tensor]], combo: dict[str, float]):
    """A copy of ``base`` with ``sum_t w_t * delta_t`` added to each targeted weight."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for task, w in combo.items():
            for path, dw in deltas[task].items():
                model.get_submodule(path).weight.add_(dw, alpha=w)
    return model


def lora_deltas(library: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{task: {module path: scaling * B @ A}}`` for every seen task's library LoRA."""
    weights, scaling = library_weights(library, SEEN)
    return {
        task: {p: scaling * (b.float() @ a.float()) for p, (a, b) in mods.items()}
        for task, mods in weights.items()
    }


def run(checkpoint: str, library: str, n: int) -> list[dict]:
    base = load_checkpoint(checkpoint)
    deltas = lora_deltas(Path(library))
    rows = []
    for spec in HELD_OUT:
        task = get_spec(spec.name).task
        acc = evaluate(base, task, "test", n, seed=EVAL_SEED)
        rows.append({"task": spec.name, "combination": "base", "weights": {}, "accuracy": acc})
        for label, combo in COMBOS.get(spec.name, []):
            model = merged_model(base, deltas, combo)
            acc = evaluate(model, task, "test", n, seed=EVAL_SEED)
            rows.append({"task": spec.name, "combination": label, "weights": combo,
                         "accuracy": acc})  # fmt: skip
    for r in rows:
        r["stderr"] = math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / n)
        print(f"{r['task']} {r['combination']} {r['weights']}: "
              f"{r['accuracy']:.3f} ± {r['stderr']:.3f}", flush=True)  # fmt: skip
    return rows


def markdown(rows: list[dict], n: int, command: str) -> str:
    out = [
        "# Held-out tasks by weight arithmetic on the library LoRAs",
        "",
        f"Exact match ± standard error, {n} test problems per cell (`EVAL_SEED`, the problems "
        "of `bench.instant_adapters`). Command: `" + command + "`.",
        "",
        "| task | combination | library weights | accuracy |",
        "|---|---|---|---|",
    ]
    for r in rows:
        w = ", ".join(f"{v:+g} {k}" for k, v in r["weights"].items()) or "-"
        out.append(f"| {r['task']} | {r['combination']} | {w} | "
                   f"{r['accuracy']:.3f} ± {r['stderr']:.3f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.instant_analogy", description=__doc__)
    ap.add_argument("--checkpoint", default="checkpoints/instant/base")
    ap.add_argument("--library", default="checkpoints/instant/library")
    ap.add_argument("-n", type=int, default=512, help="test problems per cell")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--out", default=None, help="JSON file (a .md beside it)")
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error(f"argument -n: must be >= 1, got {a.n}")
    for name in ("checkpoint", "library"):
        if not Path(getattr(a, name)).is_dir():
            ap.error(f"argument --{name}: {getattr(a, name)} is not a folder")
    torch.set_num_threads(a.threads)
    rows = run(a.checkpoint, a.library, a.n)
    if a.out:
        command = "python -m bench.instant_analogy " + " ".join(argv or sys.argv[1:])
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"environment": environment("cpu"), "command": command,
                                   "n": a.n, "rows": rows}, indent=1))  # fmt: skip
        out.with_suffix(".md").write_text(markdown(rows, a.n, command))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
