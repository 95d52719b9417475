"""Shared fixtures: a tiny untrained decoder and its fp32 export, built once per session."""

from __future__ import annotations

import pytest
import torch

from ryzen_opt.compress import export_onnx
from ryzen_opt.models import ArithmeticTask, ModelConfig, SimpleTransformerModel

# 48 positions: a 5-token prompt plus 32 decode steps (and a chunk) fit.
TINY = dict(vocab_size=32, embedding_dim=32, num_heads=2, num_layers=2, ff_dim=64, max_seq_len=48)


def tiny_model(seed: int = 0, **overrides) -> SimpleTransformerModel:
    torch.manual_seed(seed)
    m = SimpleTransformerModel(ModelConfig(**{**TINY, **overrides})).eval()
    # Non-default norms and biases, so a wrong wiring of any of them changes the logits.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif "emb" in name:
                p.mul_(25.0)  # logits of a 0.02-std model are too flat to rank tokens
    return m


@pytest.fixture(scope="session")
def model() -> SimpleTransformerModel:
    return tiny_model()


@pytest.fixture(scope="session")
def task() -> ArithmeticTask:
    return ArithmeticTask(digits=2, operators="+")


@pytest.fixture(scope="session")
def fp32_onnx(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("export") / "fp32.onnx")
