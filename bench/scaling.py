"""Best-of-n benchmark: accuracy, coverage and cost of each selection strategy against n.

Command line (from the repository root)::

    python -m bench.scaling                      # checkpoints/default, 200 test prompts
    python -m bench.scaling --quick              # 40 prompts, fewer timings (< 3 min)
    python -m bench.scaling --checkpoint runs/x  # another trained run

What it measures, on the task's test split:

1. Accuracy. Every prompt gets 64 candidates in one ``best_of_n`` call. The candidates at a
   smaller n are the first n of those: candidate j draws its randomness from (seed, prompt,
   j) only, so this is exactly what ``best_of_n(n)`` returns (part 2 checks it on every
   timed call). Per n and strategy: accuracy (the chosen candidate passes the task's
   checker), coverage (some candidate passes: the ceiling of any selection), and pass@1 (the
   share of correct samples). All strategies see the same candidates.
2. Cost. For each n the engine runs again, one prompt per call (the latency setting),
   prompts and n interleaved; per prompt: sampled tokens and wall time (sampling, checker,
   learned verifier), median over prompts. The programmatic verifier is also timed with
   early exit.
3. Shared prefill against the naive ways on identical prompts and seeds: the prompt
   repeated n times (as ``num_return_sequences`` does) and n separate calls. Outputs are
   compared token by token; times are interleaved (``ryzen_opt.timing.compare``). The
   baseline's own ``generate`` on the repeated prompt is timed as a reference (its random
   stream differs, so its outputs are not compared).

Writes ``bench/results/cpu/scaling[_quick].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ryzen_opt.cpu_info import cpu_isa
from ryzen_opt.scaling import (
    STRATEGIES,
    InferenceScalingEngine,
    LearnedVerifier,
    SamplingConfig,
    select_majority,
    select_max,
    select_verified,
    select_weighted_vote,
)
from ryzen_opt.scaling.train_verifier import load_policy
from ryzen_opt.timing import compare, format_seconds

NS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_VERIFIER = "bench/results/cpu/scaling_verifier"
console = Console()


def _choices(cands, has_learned: bool) -> dict[str, int]:
    lp = [c.mean_logprob for c in cands]
    answers = [c.answer for c in cands]
    out = {
        "verifier": select_verified([c.verified for c in cands], lp),
        "majority": select_majority(answers, lp),
        "logprob": select_max(lp),
    }
    if has_learned:
        scores = [c.learned_score for c in cands]
        out["learned"] = select_max(scores, lp)
        out["weighted_vote"] = select_weighted_vote(answers, scores, lp)
    return out


def accuracy_table(results, ns, has_learned: bool) -> dict[str, Any]:
    """Accuracy per strategy, coverage and pass@1 for each n (prefixes of the full draw)."""
    rows = {}
    total = len(results)
    all_c = [c for r in results for c in r.candidates]
    for n in ns:
        acc = dict.fromkeys(_choices(results[0].candidates[:n], has_learned), 0)
        covered = 0
        for r in results:
            cands = r.candidates[:n]
            covered += any(c.verified for c in cands)
            for s, i in _choices(cands, has_learned).items():
                acc[s] += cands[i].verified
        rows[n] = {"coverage": covered / total, **{s: a / total for s, a in acc.items()}}
    pass1 = sum(c.verified for c in all_c) / len(all_c)
    return {"by_n": rows, "pass@1": pass1, "prompts": total}


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _iqr(xs):
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def cost_table(engine, prompts, ns, max_new, full, progress) -> dict[str, Any]:
    """Per-prompt tokens and wall time for each n, one prompt per call."""
    keys = ("sample_s", "verify_s", "learned_s", "tokens", "ee_wall_s", "ee_tokens")
    data = {n: {k: [] for k in keys} for n in ns}
    mismatches = 0
    job = progress.add_task("cost", total=len(prompts) * len(ns))
    for i, p in enumerate(prompts):
        for n in ns:
            [r] = engine.best_of_n([p], n, max_new, index_offset=i)
            ref = full[i].candidates[:n]
            if [c.token_ids for c in r.candidates] != [c.token_ids for c in ref]:
                mismatches += 1
            d = data[n]
            d["sample_s"].append(r.counters.sample_s)
            d["verify_s"].append(r.counters.verify_s)
            d["learned_s"].append(r.counters.learned_s)
            d["tokens"].append(r.counters.generated_tokens)
            [e] = engine.best_of_n([p], n, max_new, index_offset=i, early_exit=True,
                                   early_exit_chunk=max(1, n // 4))
            d["ee_wall_s"].append(e.counters.sample_s + e.counters.verify_s)
            d["ee_tokens"].append(e.counters.generated_tokens)
            progress.advance(job)
    out = {}
    for n in ns:
        d = data[n]
        base = [s + v for s, v in zip(d["sample_s"], d["verify_s"], strict=True)]
        with_learned = [b + q for b, q in zip(base, d["learned_s"], strict=True)]
        out[n] = {
            "tokens_per_prompt": statistics.mean(d["tokens"]),
            "sample_s": _median(d["sample_s"]),
            "verify_s": _median(d["verify_s"]),
            "learned_s": _median(d["learned_s"]),
            # Strategies using only the sample and the checker/extraction vs the learned one.
            "wall_s": _median(base), "wall_iqr_s": _iqr(base),
            "wall_learned_s": _median(with_learned),
            "early_exit_wall_s": _median(d["ee_wall_s"]),
            "early_exit_tokens_per_prompt": statistics.mean(d["ee_tokens"]),
        }
    return {"by_n": out, "timed_prompts": len(prompts), "prefix_mismatches": mismatches}


def _same(a, b) -> tuple[bool, float]:
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        if [c.token_ids for c in ra.candidates] != [c.token_ids for c in rb.candidates]:
            return False, float("nan")
        for ca, cb in zip(ra.candidates, rb.candidates, strict=True):
            worst = max(worst, abs(ca.logprob - cb.logprob))
    return True, worst


def naive_table(engine, task, prompts, ns, separate_ns, repeat) -> dict[str, Any]:
    """Shared prefill vs repeated prompt vs separate calls: equal outputs, speed-up."""
    model, max_new = engine.model, task.max_answer_len
    ids = task.encode_prompts([task.parse_prompt(p) for p in prompts])
    eos = task.tokenizer.EOS
    out = {}
    for n in ns:
        def run(mode, n=n):
            return [engine.best_of_n([p], n, max_new, index_offset=i, mode=mode)[0]
                    for i, p in enumerate(prompts)]

        shared = run("shared")
        row: dict[str, Any] = {}
        modes = ["repeat"] + (["separate"] if n in separate_ns else [])
        for mode in modes:
            equal, worst = _same(shared, run(mode))
            cmp = compare(lambda m=mode: run(m), lambda: run("shared"), repeat=repeat,
                          warmup=1, min_sample_s=0.0)
            row[mode] = {
                "equal_outputs": equal, "max_logprob_diff": worst,
                "naive_s_per_prompt": cmp.baseline.median / len(prompts),
                "shared_s_per_prompt": cmp.candidate.median / len(prompts),
                "speedup": cmp.speedup, "ci": [cmp.ci_low, cmp.ci_high], "n_samples": repeat,
            }
        def gen(n=n):
            for k in range(len(prompts)):
                model.generate(ids[k : k + 1].repeat(n, 1), max_new, temperature=1.0,
                               eos_id=eos, seed=k)

        cmp = compare(gen, lambda: run("shared"), repeat=repeat, warmup=1, min_sample_s=0.0)
        row["baseline_generate"] = {
            "equal_outputs": None,
            "note": "model.generate on the repeated prompt, sampling only, own random stream",
            "naive_s_per_prompt": cmp.baseline.median / len(prompts),
            "shared_s_per_prompt": cmp.candidate.median / len(prompts),
            "speedup": cmp.speedup, "ci": [cmp.ci_low, cmp.ci_high], "n_samples": repeat,
        }
        out[n] = row
    return {"by_n": out, "prompts": len(prompts)}


def _plot(acc, cost, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(acc["by_n"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    a1.plot(ns, [acc["by_n"][n]["coverage"] for n in ns], "k--", lw=2, label="coverage")
    for s in STRATEGIES:
        if s in acc["by_n"][ns[0]]:
            a1.plot(ns, [acc["by_n"][n][s] for n in ns], "o-", label=s)
    a1.axhline(acc["pass@1"], color="gray", ls=":", label="pass@1")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("n (candidates per prompt)")
    a1.set_ylabel("share of test prompts")
    a1.set_title("accuracy and coverage")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    cn = sorted(cost["by_n"])
    a2.plot(cn, [cost["by_n"][n]["wall_s"] * 1e3 for n in cn], "o-", label="best-of-n")
    a2.plot(cn, [cost["by_n"][n]["wall_learned_s"] * 1e3 for n in cn], "s-",
            label="+ learned verifier")
    a2.plot(cn, [cost["by_n"][n]["early_exit_wall_s"] * 1e3 for n in cn], "^-",
            label="verifier, early exit")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("n")
    a2.set_ylabel("wall time per prompt (ms, median)")
    a2.set_title("cost (one prompt per call)")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print(acc, cost, naive, has_learned) -> None:
    strategies = [s for s in STRATEGIES if s in acc["by_n"][1]]
    t = Table(title=f"accuracy on {acc['prompts']} test prompts (pass@1 {acc['pass@1']:.3f})")
    for col in ["n", "coverage", *strategies]:
        t.add_column(col, justify="right")
    for n, row in acc["by_n"].items():
        t.add_row(str(n), f"{row['coverage']:.3f}", *(f"{row[s]:.3f}" for s in strategies))
    console.print(t)
    t = Table(title=f"cost per prompt (median of {cost['timed_prompts']} prompts, one per call)")
    for col in ("n", "tokens", "sample", "checker", "learned", "wall", "wall/wall(n=1)",
                "early-exit wall", "early-exit tokens"):
        t.add_column(col, justify="right")
    w1 = cost["by_n"][min(cost["by_n"])]["wall_s"]
    for n, r in cost["by_n"].items():
        t.add_row(str(n), f"{r['tokens_per_prompt']:.1f}", format_seconds(r["sample_s"]),
                  format_seconds(r["verify_s"]),
                  format_seconds(r["learned_s"]) if has_learned else "-",
                  format_seconds(r["wall_s"]), f"{r['wall_s'] / w1:.2f}x",
                  format_seconds(r["early_exit_wall_s"]),
                  f"{r['early_exit_tokens_per_prompt']:.1f}")
    console.print(t)
    t = Table(title=f"shared prefill vs naive ways ({naive['prompts']} prompts, same seeds)")
    for col in ("n", "naive way", "equal outputs", "naive / prompt", "shared / prompt",
                "speed-up [95% CI]"):
        t.add_column(col, justify="right")
    for n, row in naive["by_n"].items():
        for mode, r in row.items():
            eq = "n/a (own RNG)" if r["equal_outputs"] is None else str(r["equal_outputs"])
            t.add_row(str(n), mode, eq, format_seconds(r["naive_s_per_prompt"]),
                      format_seconds(r["shared_s_per_prompt"]),
                      f"{r['speedup']:.2f}x [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]")
    console.print(t)


def _goals(acc, cost, naive) -> dict[str, Any]:
    a16 = acc["by_n"].get(16)
    goals: dict[str, Any] = {}
    if a16:
        v, c = a16["verifier"], a16["coverage"]
        goals["verifier_acc16_ge_0.95_coverage16"] = {
            "verifier": v, "coverage": c, "met": v >= 0.95 * c}
        goals["verifier_acc16_above_pass1"] = {
            "verifier": v, "pass@1": acc["pass@1"], "gain": v - acc["pass@1"]}
    if 16 in cost["by_n"] and 1 in cost["by_n"]:
        r = cost["by_n"][16]["wall_s"] / cost["by_n"][1]["wall_s"]
        goals["wall16_le_3x_wall1"] = {"ratio": r, "met": r <= 3.0}
    for n, row in naive["by_n"].items():
        if "repeat" in row:
            r = row["repeat"]
            goals[f"shared_ge_2x_repeat_n{n}"] = {
                "speedup": r["speedup"], "ci": r["ci"], "equal_outputs": r["equal_outputs"],
                "met": r["equal_outputs"] and r["speedup"] >= 2.0}
    return goals


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/default",
                    help="trained run folder (with metrics.json) or its checkpoint folder")
    ap.add_argument("--verifier", default=DEFAULT_VERIFIER,
                    help="learned verifier folder (python -m ryzen_opt.scaling.train_verifier)")
    ap.add_argument("--quick", action="store_true", help="fewer prompts and timings")
    ap.add_argument("--prompts", type=int, help="test prompts for accuracy (default 200)")
    ap.add_argument("--timed-prompts", type=int, help="prompts timed per n (default 50)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench/results/cpu", help="folder for JSON and PNG")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_prompts = args.prompts or (40 if args.quick else 200)
    n_timed = args.timed_prompts or (12 if args.quick else 50)
    model, task, info = load_policy(args.checkpoint)
    learned = None
    vpath = Path(args.verifier)
    if (vpath / "verifier.yaml").is_file():
        learned = LearnedVerifier.load(vpath)
        if learned.meta.get("policy", {}).get("weights_sha256") != info["weights_sha256"]:
            console.print(f"[yellow]{vpath} was trained on other policy weights than "
                          f"{info['checkpoint']}: not used; retrain it with python -m "
                          "ryzen_opt.scaling.train_verifier --checkpoint ...")
            learned = None
    else:
        console.print(f"[yellow]no learned verifier at {vpath}: 'learned' is skipped and "
                      "'weighted_vote' weighs by the checker; train one with "
                      "python -m ryzen_opt.scaling.train_verifier")
    sampler = SamplingConfig(temperature=args.temperature, seed=args.seed)
    engine = InferenceScalingEngine(model, task, sampler=sampler, learned_verifier=learned)
    problems = task.sample("test", n_prompts, 4321)
    prompts = [task.prompt(p) for p in problems]
    max_new = task.max_answer_len
    t_start = time.perf_counter()
    with torch.no_grad():
        full = engine.best_of_n(prompts, max(NS), max_new)
        acc = accuracy_table(full, NS, learned is not None)
        engine.best_of_n(prompts[:2], 4, max_new)  # warm-up
        with Progress(console=console, transient=True) as progress:
            cost = cost_table(engine, prompts[:n_timed], NS, max_new, full, progress)
        plain = InferenceScalingEngine(model, task, sampler=sampler)
        naive = naive_table(plain, task, prompts[: 6 if args.quick else 10],
                            (16, 64) if args.quick else (4, 16, 64),
                            (16,) if args.quick else (4, 16), 5 if args.quick else 7)
    _print(acc, cost, naive, learned is not None)
    goals = _goals(acc, cost, naive)
    console.print_json(json.dumps(goals))
    stem = "scaling_quick" if args.quick else "scaling"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python -m bench.scaling " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": "cpu", "processor": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "cpu_isa": cpu_isa()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "checkpoint": {"path": info["checkpoint"], "weights_sha256": info["weights_sha256"],
                       "task": task.to_dict(),
                       "greedy_test_exact_match": info["metrics"].get("test_exact_match")},
        "learned_verifier": None if learned is None else {
            "path": str(vpath), "weights_sha256": _sha(vpath / "verifier.safetensors"),
            "validation": learned.meta.get("validation_after"),
            "train_config": learned.meta.get("train_config")},
        "sampler": sampler.to_dict(), "max_new_tokens": max_new, "ns": list(NS),
        "prompt_sample": {"split": "test", "n": n_prompts, "seed": 4321},
        "accuracy": acc, "cost": cost, "naive": naive, "goals": goals,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    _plot(acc, cost, out / f"{stem}.png",
          f"{task.to_dict()} | {n_prompts} test prompts | T={args.temperature} | "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    console.print(f"CPU ISA: {cpu_isa()}")
    console.print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')} "
                  f"({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
