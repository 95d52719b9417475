"""Hugging Face Llama prefill: ``optimize()`` against the model's own SDPA path.

    python -m bench.hf_prefill [--device cpu|cuda] [--dtype bf16|fp16|fp32] [--seq 2048]
                               [--batch 1] [--kv-heads 16] [--repeat 20] [--tiny] [-o out.json]

The goal it checks (issue tracker): a Llama-architecture model (hidden 2048, 16 layers,
random weights) on GPU, ``optimize()`` at least 1.0x its SDPA path for a 2k-token prefill,
never slower.

* Model: ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` (no download): hidden
  2048, 16 layers, 16 attention heads, 16 key/value heads (``--kv-heads``), MLP 5632, vocab
  32000, ``max_position_embeddings`` = max(2048, seq), ``attn_implementation="sdpa"``, random
  weights from ``--seed`` (default 0), built directly on the device in bf16 (CUDA default) and
  put in ``eval()`` mode.
* Input: ``batch x seq`` (default 1 x 2048) random token ids from seed ``--seed + 1``, moved
  to the device; every call of both models sees the same tensor.
* Baseline: the model as built (transformers' SDPA attention, PyTorch matmuls).
  Candidate: ``ryzen_opt.optimize(model, example_inputs=ids)``, an optimized deep copy (the
  baseline is not touched); its report (what it swapped, what it rejected and why, its own
  whole-model check) goes into the JSON.
* Workload: one prefill forward, ``model(ids, use_cache=False)`` under ``torch.no_grad()``
  (all ``batch x seq x vocab`` logits).
* Timing: both in this one process with :func:`ryzen_opt.timing.compare`: warm-up calls,
  then ``--repeat`` samples per side interleaved ABBA, each sample at least ``--min-sample-s``
  long, CUDA events on the GPU. Reported: median seconds per prefill of each side with its
  interquartile range, tokens/s, speed-up baseline/candidate with its bootstrap 95% CI, n.
* Numbers: the max absolute and relative (``||out - ref|| / ||ref||``) logit difference of
  the candidate against the baseline on the same input, with the dtype tolerance of
  DESIGN.md rule 2.
* Verdict: "faster" when the whole CI lies above 1, "slower" when it lies below 1, else "no
  significant change" (an unchanged copy times as an A/A comparison). The goal counts as met
  unless the candidate is slower beyond the noise (DESIGN.md rule 4).

``--tiny`` shrinks everything (hidden 64, 2 layers, 4 heads, MLP 128, vocab 256, seq 64,
fp32 on the CPU) so it runs in seconds; explicit ``--device``/``--dtype``/``--seq``/
``--kv-heads`` still win. Output: JSON (environment, configuration, command, results, the
optimize() report) to ``-o`` or ``bench/results/<device>/hf_prefill.json``
(``hf_prefill-tiny.json`` with ``--tiny``), a markdown table next to it, and a table on the
terminal.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    RESULTS,
    device_name,
    environment,
    markdown_table,
    print_table,
    where,
    write_json,
)

GOAL = "optimize() >= 1.0x the SDPA path for prefill, never slower"

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class Shape:
    """The model's dimensions (a ``LlamaConfig`` subset)."""

    hidden_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    intermediate_size: int = 5632
    vocab_size: int = 32000
    max_position_embeddings: int = 2048


FULL = Shape()
TINY = Shape(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=64,
)
FULL_SEQ, TINY_SEQ = 2048, 64


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an int >= {lo}, got {v}")
        return v

    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return v


def _dtype(text: str) -> torch.dtype:
    key = text.lower().removeprefix("torch.")
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {sorted(DTYPES)}, got {text!r}")
    return DTYPES[key]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.hf_prefill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    ap.add_argument(
        "--dtype", type=_dtype, default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda)"
    )
    ap.add_argument("--seq", type=_int_at_least(1), default=None, help="prompt tokens (2048)")
    ap.add_argument("--batch", type=_int_at_least(1), default=1, help="prompts per prefill")
    ap.add_argument(
        "--kv-heads", type=_int_at_least(1), default=None, help="key/value heads (= heads)"
    )
    ap.add_argument("--repeat", type=_int_at_least(3), default=20, help="samples per side")
    ap.add_argument("--warmup", type=_int_at_least(0), default=3, help="untimed calls per side")
    ap.add_argument(
        "--min-sample-s", type=_positive_float, default=2e-3, help="shortest timing sample (s)"
    )
    ap.add_argument("--seed", type=_int_at_least(0), default=0, help="weights; ids use seed+1")
    ap.add_argument(
        "--no-decision-cache",
        action="store_true",
        help="optimize() re-times every candidate instead of reading ~/.cache/ryzen_opt",
    )
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 model on the CPU (seconds)")
    ap.add_argument("-o", "--output", type=Path, default=None, help="JSON file to write")
    return ap


def resolve(args: argparse.Namespace, ap: argparse.ArgumentParser) -> tuple[Shape, str]:
    """Fill the defaults ``--tiny`` changes and check the combination; (shape, device)."""
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device not in ("cpu", "cuda"):
        ap.error(f"argument --device: must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("argument --device: cuda was asked for but CUDA is not available here")
    if args.dtype is None:
        args.dtype = torch.bfloat16 if device == "cuda" and not args.tiny else torch.float32
    base = TINY if args.tiny else FULL
    if args.seq is None:
        args.seq = TINY_SEQ if args.tiny else FULL_SEQ
    heads = base.num_attention_heads
    kv = heads if args.kv_heads is None else args.kv_heads
    if heads % kv:
        ap.error(f"argument --kv-heads: must divide the {heads} attention heads, got {kv}")
    args.kv_heads = kv
    shape = Shape(
        **{
            **asdict(base),
            "num_key_value_heads": kv,
            "max_position_embeddings": max(base.max_position_embeddings, args.seq),
        }
    )
    args.device = device
    return shape, device


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise SystemExit(
            f"error: bench.hf_prefill needs transformers (pip install ryzen-opt[hf]): {e}"
        ) from e
    return transformers


def build_model(shape: Shape, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A seeded random-weight ``LlamaForCausalLM`` on ``device`` in ``dtype``, eval mode.

    The weights are created on the device directly in ``dtype`` (no CPU copy of a
    1B-parameter model in fp32), the way ``from_pretrained(dtype=...)`` creates them: under
    that default dtype, so buffers transformers computes in fp32 (the rotary ``inv_freq``)
    stay fp32, which a ``.to(dtype)`` cast would round. The same seed gives the same weights
    on the same device.
    """
    transformers = _transformers()
    cfg = transformers.LlamaConfig(**asdict(shape))
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device).eval()
    wrong = {p.dtype for p in model.parameters()} - {dtype}
    if wrong:
        raise RuntimeError(f"model parameters came out as {wrong}, not {dtype}")
    if device == "cuda":
        torch.cuda.synchronize()
    return model


def make_ids(shape: Shape, batch: int, seq: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, shape.vocab_size, (batch, seq), generator=g).to(device)


def prefill(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The timed workload: one prefill forward without a KV cache; returns the logits."""
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def logit_difference(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Max absolute and relative (Frobenius) difference of ``out`` against ``ref``."""
    r, o = ref.detach().double(), out.detach().double()
    diff = o - r
    denom = float(r.norm())
    return {
        "max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
        "rel": float(diff.norm()) / denom if denom else float(diff.norm()),
        "max_abs_ref": float(r.abs().max()) if r.numel() else 0.0,
    }


def verdict(ci_low: float, ci_high: float) -> str:
    if ci_low > 1.0:
        return "faster"
    if ci_high < 1.0:
        return "slower"
    return "no significant change"


def run(args: argparse.Namespace, shape: Shape, device: str) -> dict[str, Any]:
    from ryzen_opt import OptimizeConfig, optimize
    from ryzen_opt.timing import compare

    dev = torch.device(device)
    t0 = time.perf_counter()
    base = build_model(shape, device, args.dtype, args.seed)
    build_s = time.perf_counter() - t0
    ids = make_ids(shape, args.batch, args.seq, device, args.seed)
    impl_before = base.config._attn_implementation

    config = OptimizeConfig(use_cache=not args.no_decision_cache)
    t0 = time.perf_counter()
    cand = optimize(base, example_inputs=ids, config=config)
    if device == "cuda":
        torch.cuda.synchronize()
    optimize_s = time.perf_counter() - t0
    report = cand.optimization_report
    if base.config._attn_implementation != impl_before:  # DESIGN.md rule 1
        raise RuntimeError(
            f"optimize() changed the baseline's attention implementation to "
            f"{base.config._attn_implementation!r}"
        )

    ref = prefill(base, ids)
    out = prefill(cand, ids)
    if device == "cuda":
        torch.cuda.synchronize()
    diff = logit_difference(ref, out)
    tol = config.tolerance_for(args.dtype, dev)
    del ref, out

    cmp = compare(
        lambda: prefill(base, ids),
        lambda: prefill(cand, ids),
        repeat=args.repeat,
        warmup=args.warmup,
        device=dev,
        min_sample_s=args.min_sample_s,
    )
    tokens = args.batch * args.seq
    v = verdict(cmp.ci_low, cmp.ci_high)
    return {
        "timing": cmp.to_dict(),
        "baseline_median_s": cmp.baseline.median,
        "optimized_median_s": cmp.candidate.median,
        "baseline_tokens_per_s": tokens / cmp.baseline.median,
        "optimized_tokens_per_s": tokens / cmp.candidate.median,
        "speedup": cmp.speedup,
        "speedup_ci": [cmp.ci_low, cmp.ci_high],
        "confidence": cmp.confidence,
        "n": cmp.baseline.n,
        "verdict": v,
        "logits": {**diff, "tolerance_rel": tol, "within_tolerance": diff["rel"] <= tol},
        "goal": {
            "goal": GOAL,
            "met": v != "slower",
            "rule": "met unless the whole speed-up CI lies below 1 (slower beyond noise)",
        },
        "model_build_s": build_s,
        "optimize_s": optimize_s,
        "optimize_report": report.to_dict(),
    }


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms"


def report_tables(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    t = res["timing"]
    headers = [
        "variant",
        "median prefill",
        "IQR",
        "tokens/s",
        "n",
        "speed-up [95% CI]",
        "max |dlogit|",
        "rel dlogit",
    ]
    lo, hi = res["speedup_ci"]
    rows = [
        [
            "baseline (SDPA)",
            _ms(t["baseline"]["median"]),
            _ms(t["baseline"]["iqr"]),
            f"{res['baseline_tokens_per_s']:,.0f}",
            str(t["baseline"]["n"]),
            "1.00x",
            "-",
            "-",
        ],
        [
            "optimize()",
            _ms(t["candidate"]["median"]),
            _ms(t["candidate"]["iqr"]),
            f"{res['optimized_tokens_per_s']:,.0f}",
            str(t["candidate"]["n"]),
            f"{res['speedup']:.3f}x [{lo:.3f}, {hi:.3f}]",
            f"{res['logits']['max_abs']:.2e}",
            f"{res['logits']['rel']:.2e}",
        ],
    ]
    return headers, rows


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    shape, device = resolve(args, ap)
    out_path = args.output
    if out_path is None:
        name = "hf_prefill-tiny.json" if args.tiny else "hf_prefill.json"
        out_path = RESULTS / device_name(device) / name

    res = run(args, shape, device)
    env = environment(device)
    if argv is not None:  # called in-process: record the arguments actually used
        env["command"] = " ".join(["python", "-m", "bench.hf_prefill", *argv])
    dtype = str(args.dtype).removeprefix("torch.")
    config = {
        "model": "LlamaForCausalLM",
        "attn_implementation": "sdpa",
        **asdict(shape),
        "batch": args.batch,
        "seq": args.seq,
        "dtype": dtype,
        "device": device,
        "seed": args.seed,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "min_sample_s": args.min_sample_s,
        "tiny": args.tiny,
        "decision_cache": not args.no_decision_cache,
        "workload": "model(ids, use_cache=False) under torch.no_grad()",
    }
    data = {
        "benchmark": "hf_prefill",
        "environment": env,
        "command": env["command"],
        "config": config,
        "results": res,
    }
    write_json(out_path, data)

    headers, rows = report_tables(res)
    on = where(env)
    title = (
        f"bench.hf_prefill: Llama {shape.num_hidden_layers}x{shape.hidden_size} "
        f"(kv heads {shape.num_key_value_heads}), prefill {args.batch}x{args.seq}, {dtype}, "
        f"on {on}, {env['torch_threads']} threads"
    )
    print_table(title, headers, rows)
    rep = res["optimize_report"]
    lo, hi = res["speedup_ci"]
    lines = [
        f"optimize(): {rep['summary']} (took {res['optimize_s']:.1f} s)",
        *[
            f"  {s['path']}: {', '.join(f'{c} -> {b}' for c, b in s['chosen'].items())}"
            for s in rep["sites"]
            if s["chosen"]
        ],
        f"logits: max |d| {res['logits']['max_abs']:.2e}, rel {res['logits']['rel']:.2e} "
        f"(tolerance {res['logits']['tolerance_rel']:g}): "
        f"{'ok' if res['logits']['within_tolerance'] else 'OUT OF TOLERANCE'}",
        f"goal ({GOAL}): {res['speedup']:.3f}x [{lo:.3f}, {hi:.3f}], {res['verdict']}: "
        f"{'met' if res['goal']['met'] else 'MISSED'}",
    ]
    print("\n".join(lines))
    out_path.with_suffix(".md").write_text(
        f"# {title}\n\n"
        + markdown_table(headers, rows)
        + "\n"
        + "\n".join(f"- {x.strip()}" for x in lines)
        + f"\n\nCommand: `{env['command']}` (commit {env['commit']})\n\n"
        + f"Versions: {env['versions']}\n"
    )
    print(f"JSON: {out_path}  table: {out_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
