"""Instant adapters side by side: trained LoRAs, Text-to-LoRA, nearest library LoRA, SVF.

    python -m bench.instant_adapters [--eval-samples 512] [--quick] [-o out.json]

On the instant adapters' base model (``checkpoints/instant/base``: the default checkpoint
fine-tuned on the seen tasks, :mod:`ryzen_opt.adapters.generalist`) and the committed
instant-adapter checkpoints (``checkpoints/instant/``: the library, ``t2l_recon``, ``t2l_sft``,
``svf``, all trained over that base; made by ``python -m ryzen_opt.adapters.instant``), in one
process, per task of the family
(:mod:`ryzen_opt.adapters.tasks`; seen and held-out):

* **accuracy** (greedy exact match, test split, the same problems for every method, with its
  standard error ``sqrt(p (1 - p) / n)``): the base model; the task's trained library LoRA
  (seen tasks); TextToLoRA trained by reconstruction and by SFT, each from a training
  paraphrase (seen tasks) and from a held-out paraphrase; the library LoRA whose training
  paraphrases are nearest (cosine of the text embeddings) to the held-out paraphrase; SVF with
  the task's own expert (oracle, seen tasks); SVF two-pass (first pass: the base model's
  hidden states classify the prompt; second: the chosen expert, top-1) and SVF with the
  classifier's alpha-mixture.
* **cost**: parameters per adapter; the time to make one (TextToLoRA ``generate``, its PEFT
  save, the nearest-LoRA lookup, an SVF expert's or mixture's weights; a library LoRA's
  training time from its ``metrics.json``).
* **decode** at batch 1 (a task prompt, ``--new-tokens`` greedy tokens) through
  ``optimize()``'s fused Numba step, every adapter applied as it is served (merged LoRA, SVF
  weights written in place), timed interleaved; and the SVF two-pass decode (identify +
  apply + generate) against a single pass with the expert already in place, 8 new tokens.

Writes ``bench/results/cpu/instant_adapters.json`` (+ ``.md``, the accuracy plot ``.png`` and
the timings as a pyperf suite ``instant_adapters-pyperf.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from bench.common import (
    RESULTS,
    ROOT,
    environment,
    installed_route,
    markdown_table,
    print_table,
    where,
    write_json,
)
from bench.inprocess import pyperf_benchmark, write_suite
from bench.instant_goals import goal_rows
from ryzen_opt import OptimizeConfig, optimize
from ryzen_opt.adapters import (
    SVFExperts,
    TextToLoRA,
    load_adapter,
    merge_adapter,
    read_config,
)
from ryzen_opt.adapters.instant import EVAL_SEED
from ryzen_opt.adapters.tasks import ALL, HELD_OUT, SEEN, get_spec
from ryzen_opt.models import load_checkpoint
from ryzen_opt.models.train import evaluate
from ryzen_opt.timing import Timing, time_fn, time_interleaved

CKPT = ROOT / "checkpoints"
METHODS = (
    "base",
    "LoRA (trained)",
    "T2L recon, train desc",
    "T2L recon, held-out desc",
    "T2L SFT, train desc",
    "T2L SFT, held-out desc",
    "nearest library LoRA",
    "SVF oracle",
    "SVF two-pass",
    "SVF alpha-mixture",
)


def fused_config(budget_s: float) -> OptimizeConfig:
    """The fused Numba decode only (as bench.adapters): the columns differ by the weights."""
    return OptimizeConfig(
        backends=(),
        fast_paths=("numba_fused_decode[serial]", "numba_fused_decode[pool]"),
        time_budget_s=budget_s,
    )


def _timing(samples: list[float]) -> Timing:
    q1, med, q3 = np.percentile(np.asarray(samples), [25, 50, 75])
    return Timing(float(med), float(q3 - q1), float(q1), float(q3), len(samples), 1, tuple(samples))


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def _merged(base, folder_or_adapter):
    m = copy.deepcopy(base)
    if isinstance(folder_or_adapter, (str, Path)):
        load_adapter(m, folder_or_adapter, "a")
    else:
        folder_or_adapter.load_into(m, "a")
    merge_adapter(m, "a")
    return m


def nearest_library(t2l: TextToLoRA, description: str, specs=SEEN) -> tuple[str, float]:
    """The seen task whose training paraphrases' embeddings are nearest (cosine)."""
    q = t2l.encoder(description)
    best, score = None, -2.0
    for s in specs:
        sim = float((t2l.encoder.encode(list(s.train_descriptions)) @ q).max())
        if sim > score:
            best, score = s.name, sim
    return best, score


def svf_two_pass_accuracy(svf, base, name: str, task, n: int, mixture: bool) -> tuple[float, float]:
    """Exact match with the first pass choosing the expert per prompt; and the share of
    prompts whose top-1 expert is the task itself."""
    problems = task.sample("test", n, EVAL_SEED)
    ids = task.encode_prompts(problems)
    model = copy.deepcopy(base)
    probs = svf.scores(base, ids)
    top = probs.argmax(1).tolist()
    correct = 0
    groups: dict = {}
    for i in range(len(problems)):
        key = tuple(round(x, 3) for x in probs[i].tolist()) if mixture else svf.names[top[i]]
        groups.setdefault(key, []).append(i)
    for key, rows in groups.items():
        svf.apply(model, dict(zip(svf.names, key, strict=True)) if mixture else key)
        out = model.generate(ids[rows], task.max_answer_len, eos_id=task.tokenizer.EOS)
        for r, row in zip(rows, out[:, ids.shape[1] :], strict=True):
            correct += task.verify(task.prompt(problems[r]), task.tokenizer.decode(row))
    hit = sum(svf.names[t] == name for t in top) / max(n, 1)
    return correct / max(n, 1), hit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.instant_adapters", description=__doc__)
    ap.add_argument("--checkpoint", default=str(CKPT / "instant" / "base"))
    ap.add_argument("--library", default=str(CKPT / "instant" / "library"))
    ap.add_argument("--t2l-recon", default=str(CKPT / "instant" / "t2l_recon"))
    ap.add_argument("--t2l-sft", default=str(CKPT / "instant" / "t2l_sft"))
    ap.add_argument("--svf", default=str(CKPT / "instant" / "svf"))
    ap.add_argument("--tasks", default=None, help="comma-separated subset of the family")
    ap.add_argument("--eval-samples", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--optimize-budget", type=float, default=60.0, help="optimize()'s time_budget_s"
    )
    ap.add_argument(
        "--quick", action="store_true", help="repeat 5, 64 eval samples, 10 s optimize budget"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args(argv)
    if a.threads is not None:
        if a.threads < 1:
            ap.error(f"argument --threads: must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    if a.quick:
        a.repeat, a.eval_samples, a.optimize_budget = 5, 64, 10.0
    if a.repeat < 3:
        ap.error(f"argument --repeat: must be >= 3, got {a.repeat}")
    if a.eval_samples < 1:
        ap.error(f"argument --eval-samples: must be >= 1, got {a.eval_samples}")
    try:
        specs = list(ALL) if a.tasks is None else [get_spec(n) for n in a.tasks.split(",")]
    except ValueError as e:
        ap.error(f"argument --tasks: {e}")
    t_start = time.perf_counter()
    base = load_checkpoint(a.checkpoint)
    library = Path(a.library)
    t2l = {"recon": TextToLoRA.load(a.t2l_recon), "sft": TextToLoRA.load(a.t2l_sft)}
    svf = SVFExperts.load(a.svf, base)
    n = a.eval_samples
    seen = {s.name for s in SEEN}

    # -- accuracy ------------------------------------------------------------------------------
    acc: dict[str, dict[str, float | None]] = {}
    extra: dict[str, dict] = {}
    for spec in specs:
        task, name = spec.task, spec.name
        row: dict[str, float | None] = dict.fromkeys(METHODS)
        ev = lambda m, task=task: evaluate(m, task, "test", n, seed=EVAL_SEED)  # noqa: E731
        row["base"] = ev(base)
        if name in seen and (library / name).is_dir():
            row["LoRA (trained)"] = ev(_merged(base, library / name))
        held = spec.heldout_descriptions[0]
        for mode, net in t2l.items():
            label = "recon" if mode == "recon" else "SFT"
            if name in seen:
                row[f"T2L {label}, train desc"] = ev(
                    _merged(base, net.generate(spec.train_descriptions[0]))
                )
            row[f"T2L {label}, held-out desc"] = ev(_merged(base, net.generate(held)))
        near, sim = nearest_library(t2l["sft"], held)
        row["nearest library LoRA"] = ev(_merged(base, library / near))
        if name in svf.names:
            m = copy.deepcopy(base)
            svf.apply(m, name)
            row["SVF oracle"] = ev(m)
        row["SVF two-pass"], hit = svf_two_pass_accuracy(svf, base, name, task, n, False)
        row["SVF alpha-mixture"], _ = svf_two_pass_accuracy(svf, base, name, task, n, True)
        acc[name] = row
        extra[name] = {
            "seen": name in seen,
            "heldout_description": held,
            "nearest": near,
            "nearest_similarity": round(sim, 4),
            "skill_identified_as_itself": hit,
        }
        print(name, {k: v for k, v in row.items() if v is not None}, flush=True)

    # -- skill identification on held-out prompts (test split) of the seen tasks ------------
    ident = {}
    for spec in SEEN:
        ids = spec.task.encode_prompts(spec.task.sample("test", n, EVAL_SEED + 7))
        got = svf.identify(base, ids)
        ident[spec.name] = sum(g == spec.name for g in got) / n
    ident_mean = sum(ident.values()) / len(ident)

    # -- cost: parameters and time to make an adapter ------------------------------------------
    probe = specs[0]
    desc = probe.heldout_descriptions[0]
    lib_cfg = read_config(library / SEEN[0].name)
    lora_params = sum(
        v.numel()
        for v in load_file(str(library / SEEN[0].name / "adapter_model.safetensors")).values()
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_instant_"))
    mix = svf.mixture(base, probe.task.encode_prompts(probe.task.sample("test", 1, 0)))
    gen_fns = {
        "T2L generate (SFT net)": lambda: t2l["sft"].generate(desc),
        # The reconstruction net is the one `ryzen-opt serve` generates with.
        "T2L generate (recon net)": lambda: t2l["recon"].generate(desc),
        "T2L generate + PEFT save": lambda: t2l["sft"].generate(desc).save(tmp / "g"),
        "nearest library LoRA lookup": lambda: nearest_library(t2l["sft"], desc),
        "SVF mixture weights": lambda: svf.weights(mix),
    }
    gen_t = {k: time_fn(f, repeat=a.repeat, warmup=3) for k, f in gen_fns.items()}
    train_s = {}
    for s in SEEN:
        f = library / s.name / "metrics.json"
        if f.is_file():
            train_s[s.name] = json.loads(f.read_text()).get("train_seconds")
    params = {
        "LoRA (trained)": lora_params,
        "T2L (generated LoRA)": t2l["sft"].generate(desc).num_parameters,
        "T2L hypernetwork (once)": sum(p.numel() for p in t2l["sft"].parameters()),
        "T2L recon hypernetwork (once)": sum(p.numel() for p in t2l["recon"].parameters()),
        "SVF expert": svf.num_parameters,
    }

    # -- decode through the fused step ---------------------------------------------------------
    threads = torch.get_num_threads()
    dspec = next((s for s in specs if s.name in svf.names), SEEN[0])
    prompt = dspec.task.encode_prompts(dspec.task.sample("test", 1, seed=0))
    if prompt.shape[1] + a.new_tokens > base.config.max_seq_len:
        ap.error(f"argument --new-tokens: prompt + {a.new_tokens} exceed max_seq_len")

    def target_weights(m) -> dict[str, torch.Tensor]:
        out = {}
        for p in svf.paths:
            mod = m.get_submodule(p)
            out[p] = getattr(mod, "base_layer", mod).weight.detach().clone()
        return out

    # Every adapter is served as plain weights (merged LoRA, SVF expert): one optimized model,
    # its target weights rewritten in place before each sample (untimed), rounds rotated.
    eager = {
        "base": copy.deepcopy(base),
        "LoRA (trained), merged": _merged(base, library / dspec.name),
        "T2L SFT, merged": _merged(base, t2l["sft"].generate(dspec.heldout_descriptions[0])),
        "SVF expert, in place": copy.deepcopy(base),
    }
    svf.apply(eager["SVF expert, in place"], dspec.name)
    weights = {k: target_weights(m) for k, m in eager.items()}
    fm = optimize(copy.deepcopy(base), config=fused_config(a.optimize_budget))
    torch.set_num_threads(threads)  # Numba's pool start resets OpenMP's threads
    route = installed_route(fm)

    @torch.no_grad()
    def put(name: str) -> None:
        for p, w in weights[name].items():
            fm.get_submodule(p).weight.copy_(w)

    same, samples = {}, {k: [] for k in eager}
    with torch.no_grad():
        for k in eager:
            put(k)
            got = fm.generate(prompt, a.new_tokens)
            same[k] = bool(torch.equal(got, eager[k].generate(prompt, a.new_tokens)))
            fm.generate(prompt, a.new_tokens)  # second warm-up call
        names = list(eager)
        for r in range(a.repeat):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                put(k)
                t0 = time.perf_counter()
                fm.generate(prompt, a.new_tokens)
                samples[k].append(time.perf_counter() - t0)
    dec = {k: _timing(v) for k, v in samples.items()}
    same_svf = same["SVF expert, in place"]

    # -- two-pass vs single pass, batch 1, 8 new tokens ---------------------------------------
    put("SVF expert, in place")

    def single():
        return fm.generate(prompt, 8)

    def two_pass():
        name = svf.identify(base, prompt)[0]  # first pass: the untouched base model
        svf.apply(fm, name)
        return fm.generate(prompt, 8)

    with torch.no_grad():
        tp = time_interleaved({"single pass": single, "two-pass": two_pass}, repeat=a.repeat)
    two_pass_ratio = tp["two-pass"].median / tp["single pass"].median

    # -- report --------------------------------------------------------------------------------
    env = environment("cpu")
    acc_head = ["task", "seen", *METHODS]
    acc_rows = [
        [
            name,
            "yes" if extra[name]["seen"] else "held out",
            *(
                "-" if row[m] is None else f"{row[m]:.3f} ± {stderr(row[m], n):.3f}"
                for m in METHODS
            ),
        ]
        for name, row in acc.items()
    ]
    title = f"bench.instant_adapters on {where(env)}, {threads} threads"
    print_table(f"{title}: exact match ± standard error, n={n} per cell", acc_head, acc_rows)
    goal_head, goal_rows_, goal_data = goal_rows(acc, n, seen)
    goal_data["svf_parameters_of_lora"] = params["SVF expert"] / params["LoRA (trained)"]
    print_table("goals: against the trained LoRA and the base model", goal_head, goal_rows_)
    near_head = ["task", "held-out description", "nearest library task", "cosine", "SVF top-1 hit"]
    near_rows = [
        [
            k,
            v["heldout_description"],
            v["nearest"],
            v["nearest_similarity"],
            f"{v['skill_identified_as_itself']:.3f}",
        ]
        for k, v in extra.items()
    ]
    print_table("nearest library LoRA and skill identification", near_head, near_rows)
    cost_head = ["adapter", "parameters"]
    cost_rows = [[k, v] for k, v in params.items()]
    print_table("parameters per adapter", cost_head, cost_rows)
    gen_head = ["making an adapter", "median", "IQR", "n"]
    gen_rows = [
        [k, f"{t.median * 1e3:.3f} ms", f"{t.iqr * 1e3:.3f} ms", t.n] for k, t in gen_t.items()
    ]
    gen_rows += [[f"LoRA training ({k})", f"{v} s", "", 1] for k, v in train_s.items()]
    print_table("time to make an adapter", gen_head, gen_rows)
    dec_head = [
        "adapter (fused Numba decode)",
        "tokens/s",
        f"generate({a.new_tokens})",
        "vs base",
        "same ids as eager",
        "route",
    ]
    b_s = dec["base"].median
    dec_rows = [
        [
            k,
            f"{a.new_tokens / t.median:.0f}",
            f"{t.median * 1e3:.2f} ms",
            f"{b_s / t.median:.2f}x",
            "yes" if same[k] else "no",
            route,
        ]
        for k, t in dec.items()
    ]
    print_table(f"decode at batch 1, {dspec.name} prompt", dec_head, dec_rows)
    tp_head = ["8 new tokens, batch 1", "median", "IQR", "n"]
    tp_rows = [[k, f"{t.median * 1e3:.3f} ms", f"{t.iqr * 1e3:.3f} ms", t.n] for k, t in tp.items()]
    tp_rows.append(["two-pass / single", f"{two_pass_ratio:.2f}x", "goal <= 1.3x", ""])
    print_table("SVF two-pass vs single pass", tp_head, tp_rows)
    print(f"skill identification on held-out prompts (mean over seen tasks): {ident_mean:.3f}")

    out = Path(a.output) if a.output else RESULTS / "cpu" / "instant_adapters.json"
    data = {
        "environment": env,
        "eval_samples": n,
        "accuracy": acc,
        "accuracy_stderr": {
            k: {m: (None if v is None else stderr(v, n)) for m, v in row.items()}
            for k, row in acc.items()
        },
        "tasks": extra,
        "skill_identification": {"per_task": ident, "mean": ident_mean},
        "goals": goal_data,
        "parameters": params,
        "lora": lib_cfg.to_dict(),
        "generation": {k: v.to_dict() for k, v in gen_t.items()},
        "library_train_seconds": train_s,
        "decode": {
            k: {**v.to_dict(), "route": route, "same_ids_as_eager": same[k]} for k, v in dec.items()
        },
        "decode_task": dspec.name,
        "new_tokens": a.new_tokens,
        "svf_fused_same_ids_as_eager": same_svf,
        "two_pass": {**{k: v.to_dict() for k, v in tp.items()}, "ratio": two_pass_ratio},
        "checkpoints": {
            "library": str(a.library),
            "t2l_recon": str(a.t2l_recon),
            "t2l_sft": str(a.t2l_sft),
            "svf": str(a.svf),
        },
    }
    write_json(out, data)
    suite = [
        pyperf_benchmark(f"instant.{kind}.{k}", t, {"kind": kind, "threads": threads})
        for kind, table in (("generation", gen_t), ("decode", dec), ("two_pass", tp))
        for k, t in table.items()
    ]
    write_suite(out.with_name(out.stem + "-pyperf.json"), suite)
    plot(acc, n, out.with_suffix(".png"), title)
    out.with_suffix(".md").write_text(
        f"# {title}\n\nExact match ± standard error, {n} test problems per cell "
        f"(the same problems for every method).\n\n"
        + markdown_table(acc_head, acc_rows)
        + "\nGoals (`bench/instant_goals.py`): a fraction of the LoRA's accuracy, and the share "
        "of its gain over the base, `(x - base) / (LoRA - base)`; held-out tasks: differences "
        "± their standard error. SVF parameters: "
        f"{goal_data['svf_parameters_of_lora']:.4f} of a LoRA's.\n\n"
        + markdown_table(goal_head, goal_rows_)
        + "\n"
        + markdown_table(near_head, near_rows)
        + f"\nSkill identification on held-out prompts of the seen tasks: {ident_mean:.3f}"
        f" ({', '.join(f'{k} {v:.3f}' for k, v in ident.items())})\n\n"
        + markdown_table(cost_head, cost_rows)
        + "\n"
        + markdown_table(gen_head, gen_rows)
        + "\n"
        + markdown_table(dec_head, dec_rows)
        + f"\nSVF weights in place through the fused step give the eager model's ids: {same_svf}"
        + "\n\n"
        + markdown_table(tp_head, tp_rows)
        + f"\nCommand: `{env['command']}` (commit {env['commit']})\n\nVersions: {env['versions']}\n"
    )
    print(f"JSON: {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


def plot(acc: dict, n: int, path: Path, title: str) -> None:
    """Grouped bars: accuracy per task for every method, standard-error whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(acc)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(tasks)), 4.8))
    width = 0.8 / len(METHODS)
    for j, m in enumerate(METHODS):
        xs = [i + (j - len(METHODS) / 2 + 0.5) * width for i in range(len(tasks))]
        ys = [acc[t][m] if acc[t][m] is not None else 0.0 for t in tasks]
        es = [stderr(acc[t][m], n) if acc[t][m] is not None else 0.0 for t in tasks]
        ax.bar(xs, ys, width, yerr=es, label=m, color=plt.cm.tab10(j % 10), capsize=1)
    held = {s.name for s in HELD_OUT}
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n(held out)" if t in held else t for t in tasks], fontsize=8)
    ax.set_ylabel(f"test exact match (n={n})")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
