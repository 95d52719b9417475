"""Test-only backends and helpers for the optimizer tests.

The fake backends are registered for the duration of one test and removed afterwards. A
"fast" candidate is made honestly faster by slowing the *baseline* of the plan (a sleep in
front of the original computation), never by faking a timing.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from ryzen_opt import ModelConfig, OptimizeConfig, SimpleTransformerModel
from ryzen_opt.kernels import reference, registry

BASELINE_SLEEP_S = 5e-3  # far above a tiny reference op (~30 us), so the win is unmistakable


class CountingLauncher:
    """Wraps a launcher and counts calls (shows the optimized model really routes to it)."""

    def __init__(self, fn, sleep_s: float = 0.0, scale: float = 1.0):
        self.fn, self.sleep_s, self.scale, self.calls = fn, sleep_s, scale, 0
        self.activations: list = []

    def __call__(self, *args):
        self.calls += 1
        if len(args) > 3 and isinstance(args[3], (str, type(None))):
            self.activations.append(args[3])
        if self.sleep_s:
            time.sleep(self.sleep_s)
        out = self.fn(*args)
        return out * self.scale if self.scale != 1.0 else out


@contextmanager
def one_thread():
    """One intra-op thread: on 2 shared cores, OpenMP threads spinning against other jobs made
    a tiny SDPA take 12 ms instead of 40 us (measured), drowning every timing in noise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextmanager
def registered(op: str, name: str, launcher, devices=("cpu",)):
    """Register a backend for the ``with`` block only."""
    registry.register(op, name, devices, launcher)
    try:
        yield launcher
    finally:
        # The registry has no public unregister; remove exactly the entry added above.
        registry.unregister(op, name)


def tiny_model(num_layers: int = 1, seed: int = 0) -> SimpleTransformerModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=64,
        embedding_dim=32,
        num_heads=2,
        num_layers=num_layers,
        ff_dim=64,
        max_seq_len=16,
    )
    return SimpleTransformerModel(cfg).eval()


def fast_config(tmp_path, **kw) -> OptimizeConfig:
    """Small shapes and few samples: the tests check decisions, not precise speed-ups.

    Model-level fast paths are off unless a test asks for them (tests/optimizer/
    test_fastpath.py): the kernel-decision tests need the per-site choices alone.
    """
    base = dict(
        fast_paths=(),
        repeat=7,
        warmup=1,
        min_sample_s=1e-3,
        prefill_shape=(2, 8),
        decode_batches=(1, 2),
        cache_dir=tmp_path / "cache",
    )
    base.update(kw)
    return OptimizeConfig(**base)


def slow_baselines(plan, seconds: float = BASELINE_SLEEP_S) -> None:
    """Put a sleep in front of every site's original computation in ``plan``."""
    for site in plan.sites:
        for case in site.cases:

            def slowed(fn=case.baseline):
                time.sleep(seconds)
                return fn()

            case.baseline = slowed


def reference_matmul(*args):
    return reference.matmul(*args)


def reference_attention(*args):
    return reference.attention(*args)


def reference_layer_norm(*args):
    return reference.layer_norm(*args)
