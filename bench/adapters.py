"""LoRA adapters on the seed model: load, switch, decode speed and the skill they add.

    python -m bench.adapters [--adapter FOLDER | --train-steps N] [--new-tokens 32]
                             [--device cpu|cuda] [-o out.json]

On the trained default checkpoint (``checkpoints/default``), in one process:

* **operations**: loading an adapter from disk (files in the page cache) into a model whose
  layers are already wrapped (what a registry reload costs) and into a plain model (the first
  load also wraps the layers); switching between two resident adapters with
  ``AdapterRegistry.activate``, unmerged (names only) and merged (exact restore of the base
  weights, then fold the next adapter in). Goals: load <= 2.5 ms, switch <= 0.5 ms.
* **decode**: greedy ``generate`` at batch 1 (a task prompt, then ``--new-tokens`` tokens,
  prefill included), every variant timed interleaved on the same prompt: the base model,
  the adapter merged, unmerged, and the same adapter under ``peft`` (``PeftModel``). A
  variant is one entry of :data:`DECODE_VARIANTS`; fused and mixed-batch LoRA kernels join
  as entries there. Each variant's one-token ``generate`` is timed in the same rounds, so a
  decode step's time comes out with the prefill cancelled:
  ``(t(new_tokens) - t(1)) / (new_tokens - 1)``, the medians first.
* **accuracy**: greedy exact match on the adapter's task, test split, base vs adapter.

On ``--device cuda`` the model, the adapters and every variant live on the GPU, the fused
columns are ``optimize()`` offered the Triton decode graph (``triton_graph_decode``, which adds
unmerged and mixed-batch updates inside its kernels) and the CUDA-graph step, and every timed
call ends with a device synchronization.

Writes ``bench/results/<device>/adapters.json`` (every sample) and ``.md`` (the tables), and the
timings as a pyperf suite, ``adapters-pyperf.json`` (``python -m pyperf show`` reads it).

The adapter comes from ``--adapter`` (a PEFT-format folder; ``checkpoints/lora_mul2`` by
default, trained by ``python -m ryzen_opt.adapters.train``) or, with ``--train-steps N``, from
a short training run in this process; the output says which.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

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
from ryzen_opt import OptimizeConfig, optimize
from ryzen_opt.adapters import (
    AdapterRegistry,
    delete_adapter,
    load_adapter,
    merge_adapter,
    mixed_batch,
    read_config,
    remove_lora,
    set_adapter,
)
from ryzen_opt.models import load_checkpoint
from ryzen_opt.models.tasks import ArithmeticTask
from ryzen_opt.models.train import evaluate
from ryzen_opt.timing import Timing, time_fn, time_interleaved

DEFAULT_ADAPTER = ROOT / "checkpoints" / "lora_mul2"
GOALS = {"load": 2.5e-3, "switch": 0.5e-3}


def _timing(samples: list[float]) -> Timing:
    q1, med, q3 = np.percentile(np.asarray(samples), [25, 50, 75])
    return Timing(float(med), float(q3 - q1), float(q1), float(q3), len(samples), 1, tuple(samples))


def _sync(model) -> None:
    """Wait for the model's device (a GPU's queued kernels are part of the timed call)."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time_load(base, folder: Path, repeat: int, wrapped: bool) -> Timing:
    """One ``load_adapter`` per sample; the removal between samples is not timed."""
    model = copy.deepcopy(base)
    if wrapped:  # a registry's model after its first load: layers wrapped, adapter evicted
        load_adapter(model, folder, "warm")
        delete_adapter(model, "warm")
    samples = []
    for _ in range(repeat + 2):
        t0 = time.perf_counter()
        load_adapter(model, folder, "x")
        _sync(model)
        samples.append(time.perf_counter() - t0)
        delete_adapter(model, "x") if wrapped else remove_lora(model)
    return _timing(samples[2:])  # the first two warm the file cache and the allocator


def _time_switch(base, folder: Path, repeat: int, merged: bool) -> Timing:
    reg = AdapterRegistry(copy.deepcopy(base), max_resident=2, merged=merged)
    reg.register("a", folder)
    reg.register("b", folder)
    # Both names load the same folder: a switch's cost does not depend on the values.
    toggle = {"next": "a"}

    def switch():
        name = toggle["next"]
        reg.activate(name)
        _sync(reg.model)
        toggle["next"] = "b" if name == "a" else "a"

    switch()
    switch()
    return time_fn(switch, repeat=repeat, warmup=4)


# -- decode variants: name -> builder(base model, adapter folder) -> model with .generate ------
def _base(base, folder):
    return base


def _unmerged(base, folder):
    m = load_adapter(copy.deepcopy(base), folder, "a")
    set_adapter(m, "a")
    return m


def _merged(base, folder):
    m = load_adapter(copy.deepcopy(base), folder, "a")
    merge_adapter(m, "a")
    return m


# optimize() offered only the seed model's fused Numba decode step (its per-op sites off, so
# the columns differ by the step alone); it keeps the step only where it measured it faster.
FUSED = OptimizeConfig(
    backends=(), fast_paths=("numba_fused_decode[serial]", "numba_fused_decode[pool]")
)
# On CUDA: the Triton decode graph (LoRA inside its kernels) and the plain CUDA-graph step.
FUSED_CUDA = OptimizeConfig(backends=(), fast_paths=("triton_graph_decode", "cuda_graph_decode"))


def _fused(model):
    threads = torch.get_num_threads()
    cuda = next(model.parameters()).device.type == "cuda"
    fast = optimize(model, config=FUSED_CUDA if cuda else FUSED)
    # Numba's pool start (measuring the pool mode) resets the process's OpenMP threads.
    torch.set_num_threads(threads)
    fast.bench_route = installed_route(fast)
    return fast


def _base_fused(base, folder):
    return _fused(base)


def _unmerged_fused(base, folder):
    return _fused(_unmerged(base, folder))


def _merged_fused(base, folder):
    return _fused(_merged(base, folder))


def _peft(base, folder):
    from peft import PeftModel

    # PeftModel injects its LoRA layers into the model in place; the model's own generate
    # then runs through them (PeftModel of a custom model has no generate of its own).
    m = copy.deepcopy(base)
    PeftModel.from_pretrained(m, str(folder)).eval()
    return m


_ONE = " [1 token]"  # the one-token generate of a variant, for its decode step time

DECODE_VARIANTS: dict[str, Callable] = {
    "base": _base,
    "merged": _merged,
    "unmerged": _unmerged,
    "peft": _peft,
    "base, optimize()": _base_fused,
    "merged, optimize()": _merged_fused,
    "unmerged, optimize()": _unmerged_fused,
}


def _many(base, folder, n: int):
    """The adapter loaded ``n`` times (``a0``...), each ``B`` scaled differently so that
    the adapters differ; none active."""
    m = copy.deepcopy(base)
    for i in range(n):
        load_adapter(m, folder, f"a{i}")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B__a" in name:
                p.mul_(1.0 + 0.1 * int(name.rsplit("__a", 1)[1]))
    return m


def _reset_counts(models) -> None:
    for m in models:
        paths = m.__dict__.get("_fast_paths")
        if paths is not None:
            paths.decode_steps.update(fast=0, model=0)


def _with_counts(route: str, model) -> str:
    """``route`` and how many decode steps of the timed calls the fast path computed (the
    rest ran the model's own code): what ran, beside what ``optimize()`` chose."""
    paths = model.__dict__.get("_fast_paths")
    if paths is None:
        return route
    d = paths.decode_steps
    return f"{route} (fast path ran {d['fast']} of {d['fast'] + d['model']} decode steps)"


def measure_mixed(base, folder: Path, prompt: torch.Tensor, new_tokens: int, repeat: int):
    """Greedy generate of 16 rows where row ``r`` uses adapter ``r % n`` (n = 1, 4, 16),
    eager and through optimize()'s fused step, timed interleaved; each variant's ids are
    checked against the eager run of the same mix."""
    rows = prompt.expand(16, -1).contiguous()
    fns, outs, routes, models = {}, {}, {}, {}
    for n in (1, 4, 16):
        eager = _many(base, folder, n)
        fast = _fused(copy.deepcopy(eager))
        names = [f"a{r % n}" for r in range(16)]
        for kind, m in (("eager", eager), ("optimize()", fast)):
            key = f"16 rows over {n} adapter{'s' if n > 1 else ''}, {kind}"

            def run(m=m, names=names):
                with mixed_batch(m, names):
                    out = m.generate(rows, new_tokens)
                _sync(m)
                return out

            fns[key], outs[key] = run, run()
            routes[key] = getattr(m, "bench_route", "")
            models[key] = m
    _reset_counts(models.values())
    with torch.no_grad():
        timings = time_interleaved(fns, repeat=repeat, warmup=1)
    routes = {k: _with_counts(r, models[k]) for k, r in routes.items()}
    same = {k: bool(torch.equal(outs[k], outs[k.replace("optimize()", "eager")])) for k in outs}
    return timings, same, routes


def measure_decode(base, folder: Path, prompt: torch.Tensor, new_tokens: int, repeat: int):
    """Every variant's ``generate(prompt, new_tokens)`` and ``generate(prompt, 1)`` timed
    interleaved: the first is the call a user makes, the difference of the medians over
    ``new_tokens - 1`` is a decode step's time with the prefill cancelled out."""
    models = {name: build(base, folder) for name, build in DECODE_VARIANTS.items()}
    routes = {n: getattr(m, "bench_route", "") for n, m in models.items()}
    outs = {n: m.generate(prompt, new_tokens) for n, m in models.items()}

    def run(m, n):
        out = m.generate(prompt, n)
        _sync(m)
        return out

    fns = {n: (lambda m=m: run(m, new_tokens)) for n, m in models.items()}
    fns.update({f"{n}{_ONE}": (lambda m=m: run(m, 1)) for n, m in models.items()})
    _reset_counts(models.values())
    with torch.no_grad():
        both = time_interleaved(fns, repeat=repeat, warmup=2)
    routes = {n: _with_counts(r, models[n]) for n, r in routes.items()}
    timings = {n: both[n] for n in models}
    steps = {
        n: max(both[n].median - both[f"{n}{_ONE}"].median, 0.0) / max(new_tokens - 1, 1)
        for n in models
    }
    same = {n: bool(torch.equal(outs[n], outs["merged"])) for n in models}
    return timings, same, routes, steps


def _adapter(args, base, workdir: Path) -> tuple[Path, str]:
    if args.train_steps is None:
        folder = Path(args.adapter).resolve()
        shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
        return folder, f"saved adapter {shown}"
    from ryzen_opt.adapters import AdapterTrainConfig, LoraConfig, save_adapter, train_adapter

    cfg = AdapterTrainConfig(steps=args.train_steps, warmup_steps=min(50, args.train_steps))
    model = copy.deepcopy(base)
    out = train_adapter(model, LoraConfig(rank=16, alpha=32), cfg)
    folder = save_adapter(model, workdir / "trained")
    return folder, f"trained here: {args.train_steps} steps in {out['train_seconds']} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.adapters", description=__doc__)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "default"))
    ap.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="PEFT-format folder")
    ap.add_argument("--train-steps", type=int, default=None, help="train an adapter instead")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--eval-samples", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="repeat 5, 128 eval samples")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 keeps a batch-1 decode on a shared 2-core "
        "machine clear of OpenMP barrier stalls (measured: 2.3 s samples of a 25 ms call)",
    )
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("argument --device: cuda is not available")
    if a.threads is not None:
        if a.threads < 1:
            ap.error(f"argument --threads: must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    if a.quick:
        a.repeat, a.eval_samples = 5, 128
    if a.repeat < 3:
        ap.error(f"argument --repeat: must be >= 3, got {a.repeat}")
    if a.train_steps is not None and a.train_steps < 1:
        ap.error(f"argument --train-steps: must be >= 1, got {a.train_steps}")
    t0 = time.perf_counter()
    base = load_checkpoint(a.checkpoint).to(a.device)
    with tempfile.TemporaryDirectory(prefix="bench_adapters_") as tmp:
        folder, source = _adapter(a, base, Path(tmp))
        meta = (
            json.loads((folder / "metrics.json").read_text())
            if (folder / "metrics.json").is_file()
            else {}
        )
        train = meta.get("train", {"digits": 2, "operators": "*"})
        task = ArithmeticTask(train["digits"], train["operators"])
        if task.prompt_len + a.new_tokens > base.config.max_seq_len:
            ap.error(f"argument --new-tokens: prompt + {a.new_tokens} exceed max_seq_len")
        ops = {
            "load (layers wrapped)": _time_load(base, folder, a.repeat, wrapped=True),
            "load (first: wraps layers)": _time_load(base, folder, a.repeat, wrapped=False),
            "switch, unmerged": _time_switch(base, folder, a.repeat, merged=False),
            "switch, merged": _time_switch(base, folder, a.repeat, merged=True),
        }
        prompt = task.encode_prompts(task.sample("test", 1, seed=0)).to(a.device)
        decode, same, routes, steps = measure_decode(base, folder, prompt, a.new_tokens, a.repeat)
        mixed, mixed_same, mixed_routes = measure_mixed(
            base, folder, prompt, a.new_tokens, max(3, a.repeat // 3)
        )
        tuned = load_adapter(copy.deepcopy(base), folder, "a")
        set_adapter(tuned, "a")
        acc = {
            "base": evaluate(base, task, "test", a.eval_samples, seed=4321),
            "adapter": evaluate(tuned, task, "test", a.eval_samples, seed=4321),
        }
    env = environment(a.device)
    lora = read_config(folder).to_dict() if folder.exists() else {}
    op_rows = []
    for name, t in ops.items():
        goal = GOALS["load" if name.startswith("load") else "switch"]
        met = "yes" if t.median <= goal else "no"
        op_rows.append(
            [
                name,
                f"{t.median * 1e3:.3f} ms",
                f"{t.iqr * 1e3:.3f} ms",
                t.n,
                f"<= {goal * 1e3:g} ms",
                met,
            ]
        )
    base_s = decode["base"].median
    fused_s = decode["base, optimize()"].median
    fused_step = steps["base, optimize()"]

    def _step_cols(name):
        st = steps[name]
        if st <= 0:  # the one-token call took as long: no step time to report
            return ["-", "-"]
        return [f"{st * 1e6:.1f} us", f"{fused_step / st:.2f}x"]

    dec_rows = [
        [
            name,
            f"{a.new_tokens / t.median:.0f}",
            f"{t.median * 1e3:.2f} ms",
            f"{base_s / t.median:.2f}x",
            f"{fused_s / t.median:.2f}x",
            *_step_cols(name),
            "yes" if same[name] else "no",
            routes[name],
        ]
        for name, t in decode.items()
    ]
    single = {k.rsplit(", ", 1)[1]: t.median for k, t in mixed.items() if "over 1 " in k}
    mix_rows = [
        [
            name,
            f"{16 * a.new_tokens / t.median:.0f}",
            f"{t.median * 1e3:.2f} ms",
            f"{t.median / single[name.rsplit(', ', 1)[1]]:.2f}x",
            "yes" if mixed_same[name] else "no",
            mixed_routes[name],
        ]
        for name, t in mixed.items()
    ]
    mix_head = [
        "batch",
        "tokens/s",
        f"generate({a.new_tokens})",
        "time vs 1 adapter",
        "same ids as eager",
        "route",
    ]
    title = f"bench.adapters on {where(env)}, {torch.get_num_threads()} threads"
    print_table(
        f"{title}: adapter operations", ["operation", "median", "IQR", "n", "goal", "met"], op_rows
    )
    dec_head = [
        "variant",
        "tokens/s",
        f"generate({a.new_tokens})",
        "vs base",
        "vs base, optimize()",
        "decode step",
        "step vs base, optimize()",
        "same ids as merged",
        "route",
    ]
    print_table(f"decode at batch 1, {task.prompt_len}-token prompt", dec_head, dec_rows)
    print_table("mixed batches (row r uses adapter r % n)", mix_head, mix_rows)
    acc_rows = [
        [f"{task.to_dict()}", f"{acc['base']:.3f}", f"{acc['adapter']:.3f}", a.eval_samples]
    ]
    acc_head = ["task (test split)", "base exact match", "with adapter", "problems"]
    print_table(f"accuracy ({source})", acc_head, acc_rows)
    out = Path(a.output) if a.output else RESULTS / a.device / "adapters.json"
    write_json(
        out,
        {
            "environment": env,
            "adapter_source": source,
            "lora": lora,
            "new_tokens": a.new_tokens,
            "operations": {k: v.to_dict() for k, v in ops.items()},
            "decode": {
                k: {
                    **v.to_dict(),
                    "decode_step_s": steps[k],
                    "same_ids_as_merged": same[k],
                    "route": routes[k],
                }
                for k, v in decode.items()
            },
            "mixed": {
                k: {**v.to_dict(), "same_ids_as_eager": mixed_same[k], "route": mixed_routes[k]}
                for k, v in mixed.items()
            },
            "accuracy": {**acc, "task": task.to_dict(), "eval_samples": a.eval_samples},
        },
    )
    suite = [
        pyperf_benchmark(
            f"adapters.{kind}.{name}", t, {"kind": kind, "threads": env["torch_threads"]}
        )
        for kind, table in (("operation", ops), ("decode", decode), ("mixed", mixed))
        for name, t in table.items()
    ]
    write_suite(out.with_name(out.stem + "-pyperf.json"), suite)
    out.with_suffix(".md").write_text(
        f"# {title}\n\nAdapter: {source} ({lora})\n\n"
        + markdown_table(["operation", "median", "IQR", "n", "goal", "met"], op_rows)
        + "\n"
        + markdown_table(dec_head, dec_rows)
        + "\n"
        + markdown_table(mix_head, mix_rows)
        + "\n"
        + markdown_table(acc_head, acc_rows)
        + f"\nCommand: `{env['command']}` (commit {env['commit']})\n\nVersions: {env['versions']}\n"
    )
    print(f"JSON: {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
