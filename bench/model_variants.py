"""The ways ``bench.model`` runs the model: the baseline and its variants, one class each.

Each variant is built from the baseline's weights (``build(model, device)``) and answers
``obj(idx, kv_cache=None) -> (logits, cache)`` and ``obj.generate(idx, max_new_tokens)``, so
the same workloads time every column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.models import SimpleTransformerModel

# optimize() settings of --quick: 8 interleaved samples per decision instead of 20 and 2
# warm-up calls instead of 3. Its decisions then take about half the time; the wider
# confidence interval can only reject more borderline swaps, never accept a slower one.
QUICK_OPTIMIZE = {"repeat": 8, "warmup": 2}
# Set by bench.model from --quick (its peak-memory children get the flag too).
settings = {"quick": False}


@dataclass
class Variant:
    """A way of running the model: built once per process from the baseline's weights."""

    name: str
    build: Callable[[SimpleTransformerModel, str], Any]  # -> object with forward/generate
    available: Callable[[str], str | None] = lambda device: None


def _baseline(model: SimpleTransformerModel, device: str) -> SimpleTransformerModel:
    return model


def _compiled(model: SimpleTransformerModel, device: str):
    return _CompiledModel(model)


class _CompiledModel:
    """``torch.compile`` of the baseline's forward; generation runs the same loop."""

    def __init__(self, model: SimpleTransformerModel) -> None:
        self.model = model
        self._fwd = torch.compile(model, dynamic=True)

    def __call__(self, idx, kv_cache=None):
        return self._fwd(idx, kv_cache)

    def generate(self, idx, max_new_tokens, **kw):
        # Reuse the baseline's sampling loop, with the compiled forward underneath.
        return _generate_with(self, self.model, idx, max_new_tokens)


def _generate_with(fwd, model, idx, max_new_tokens):
    with torch.no_grad():
        logits, cache = fwd(idx)
        toks = [idx]
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            if step < max_new_tokens - 1:
                logits, cache = fwd(nxt, cache)
        return torch.cat(toks, 1)


def _optimized(model: SimpleTransformerModel, device: str) -> SimpleTransformerModel:
    """``ryzen_opt.optimize()``: verified, measured kernel swaps (unchanged if none wins).

    Timing decisions are cached on disk (``~/.cache/ryzen_opt``), so only the first worker
    process pays for the measurements; each still re-verifies every swap numerically.
    """
    from ryzen_opt import OptimizeConfig, optimize

    if settings["quick"]:
        return optimize(model, config=OptimizeConfig(**QUICK_OPTIMIZE))
    return optimize(model)


class _OrtModel:
    """The baseline exported to ONNX (fp32, KV cache) and run by ONNX Runtime on the CPU."""

    def __init__(self, model: SimpleTransformerModel) -> None:
        import tempfile

        from ryzen_opt.compress import OnnxGenerator, export_onnx

        # One export per process: the weights are the seeded baseline's, so the file is the
        # same in every pyperf worker; exporting takes seconds, so it stays out of the timing.
        self._dir = tempfile.TemporaryDirectory(prefix="ryzen_opt_bench_model_")
        path = export_onnx(model, Path(self._dir.name) / "model.onnx")
        self.gen = OnnxGenerator(path, threads=torch.get_num_threads())

    def __call__(self, idx, kv_cache=None):
        logits, present = self.gen.forward(idx.cpu().numpy(), past=kv_cache)
        return torch.from_numpy(logits), present

    def generate(self, idx, max_new_tokens, **kw):
        return torch.from_numpy(self.gen.generate(idx.cpu().numpy(), max_new_tokens))


def _onnxruntime(model: SimpleTransformerModel, device: str) -> _OrtModel:
    return _OrtModel(model)


VARIANTS: dict[str, Variant] = {
    "baseline": Variant("baseline", _baseline),
    "torch.compile": Variant("torch.compile", _compiled),
    "optimize()": Variant("optimize()", _optimized),
    "onnxruntime": Variant(
        "onnxruntime",
        _onnxruntime,
        lambda device: None if device == "cpu" else "ONNX Runtime column is CPU-only here",
    ),
}
