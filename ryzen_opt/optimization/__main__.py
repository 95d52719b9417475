"""``python -m ryzen_opt.optimization``: optimize the reference model here and print the report.

Example::

    python -m ryzen_opt.optimization --device cuda --dtype bf16 --json report.json
"""

from __future__ import annotations

import argparse
import sys

import torch

# An entry point (nothing imports it): it drives the public front door, as a user would.
from ryzen_opt import optimize
from ryzen_opt.models import ModelConfig, SimpleTransformerModel
from ryzen_opt.optimization.config import OptimizeConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ryzen_opt.optimization", description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", type=int, default=None, help="override ModelConfig.num_layers")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--no-cache", action="store_true", help="measure everything afresh")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--markdown", default=None, help="write the report as markdown here")
    p.add_argument(
        "--generate",
        type=int,
        default=32,
        help="greedy tokens to compare original vs optimized (0: skip)",
    )
    a = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = ModelConfig() if a.layers is None else ModelConfig(num_layers=a.layers)
    model = (
        SimpleTransformerModel(cfg)
        .eval()
        .to(
            a.device,
            getattr(
                torch,
                {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(a.dtype, a.dtype),
            ),
        )
    )
    fast = optimize(model, config=OptimizeConfig(repeat=a.repeat, use_cache=not a.no_cache))
    report = fast.optimization_report
    report.print()
    if a.json:
        report.to_json(a.json)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(report.to_markdown())
    if a.generate:
        prompt = torch.randint(0, cfg.vocab_size, (1, 8), device=a.device)
        same = torch.equal(model.generate(prompt, a.generate), fast.generate(prompt, a.generate))
        print(f"greedy generate({a.generate}) identical to the original: {same}")
    print(f"optimize() took {report.elapsed_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
