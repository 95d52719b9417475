"""What ``SemanticCompressor`` measures besides size: exact-match accuracy of an artifact
(ONNX Runtime) or of the PyTorch model, and the speed-up read from interleaved timings."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ryzen_opt.compress.runtime import OnnxGenerator
from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.models.tasks import ArithmeticTask
from ryzen_opt.timing import Comparison


def paired_speedup(cmp: Comparison, resamples: int = 2000) -> Comparison:
    """``cmp`` with its speed-up the median of the per-pair ratios, and a bootstrap interval.

    :func:`ryzen_opt.timing.compare` takes baseline sample ``i`` and candidate sample ``i``
    back to back (ABBA), so their ratio cancels load that changes slower than a pair, which
    the ratio of the two medians does not. On the 2-core reference machine running five
    other jobs (load average 5.7), fp32 against itself read 0.79-1.50x as a ratio of medians
    and 0.96-1.04x as the median ratio of pairs (101 samples of >= 0.5 ms, 1 thread, 6 runs).
    """
    ratios = np.asarray(cmp.baseline.samples) / np.asarray(cmp.candidate.samples)
    rng = np.random.default_rng(0)
    boots = np.median(ratios[rng.integers(0, len(ratios), (resamples, len(ratios)))], axis=1)
    alpha = (1 - cmp.confidence) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return dataclasses.replace(
        cmp, speedup=float(np.median(ratios)), ci_low=float(lo), ci_high=float(hi)
    )


def onnx_accuracy(gen: OnnxGenerator, task: ArithmeticTask, n: int, seed: int) -> float:
    """Greedy exact-match accuracy of an ONNX decoder on ``n`` test-split problems.

    Args:
        gen: the generator.
        task: the task.
        n: problems.
        seed: draws them.

    Returns:
        Fraction correct.
    """
    problems = task.sample("test", n, seed)
    correct = 0
    for i in range(0, n, 256):
        chunk = problems[i : i + 256]
        ids = task.encode_prompts(chunk).numpy()
        out = gen.generate(ids, task.max_answer_len, eos_id=task.tokenizer.EOS)
        for p, row in zip(chunk, out[:, ids.shape[1] :], strict=True):
            correct += task.verify(task.prompt(p), task.tokenizer.decode(row.tolist()))
    return correct / max(n, 1)


@torch.no_grad()
def torch_accuracy(model: SimpleTransformerModel, task: ArithmeticTask, n: int, seed: int) -> float:
    """The same metric with ``model.generate`` (PyTorch), for the export's sanity."""
    problems = task.sample("test", n, seed)
    correct = 0
    for i in range(0, n, 256):
        chunk = problems[i : i + 256]
        ids = task.encode_prompts(chunk)
        out = model.generate(ids, task.max_answer_len, eos_id=task.tokenizer.EOS)
        for p, row in zip(chunk, out[:, ids.shape[1] :], strict=True):
            correct += task.verify(task.prompt(p), task.tokenizer.decode(row))
    return correct / max(n, 1)
