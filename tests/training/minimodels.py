"""Small models of every family ``optimize_training`` serves, and their training batches."""

from __future__ import annotations

import torch

from ryzen_opt.models import ModelConfig, SimpleTransformerModel
from ryzen_opt.models.tasks import ArithmeticTask
from tests.optimizer.hf_models import VOCAB, tiny

FAMILIES = ("seed", "llama", "qwen2", "gpt2")


def build(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A small random model of ``family``."""
    if family == "seed":
        torch.manual_seed(seed)
        cfg = ModelConfig(
            vocab_size=64, embedding_dim=32, num_heads=2, num_layers=2, ff_dim=64, max_seq_len=32
        )
        return SimpleTransformerModel(cfg).to(dtype)
    return tiny(family, dtype, seed)


def batches(family: str, n: int, batch: int = 4, seed: int = 0) -> list[dict]:
    """``n`` training batches: the arithmetic task for the seed model (labels aligned, the
    prompt ignored), random ids with a masked prefix for transformers (labels unshifted)."""
    if family == "seed":
        task = ArithmeticTask(2, "+-")
        data = task.sample("train", n * batch, seed)
        out = []
        for i in range(n):
            x, y = task.encode_training(data[i * batch : (i + 1) * batch])
            out.append({"input_ids": x, "labels": y})
        return out
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, 11), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return out
