"""A deterministic adapter generator for tests and ``bench.serve``: not a hypernetwork.

It writes a real PEFT-format LoRA adapter for the served model (``add_lora`` +
``save_adapter``) whose weights are drawn from a hash of the description and seed: the same
description and seed give the same adapter, different ones (almost surely) different
adapters. It stands in for ``TextToLoRA`` where the server's plumbing is what is tested or
timed; what it generates means nothing.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from pathlib import Path

import torch

from ryzen_opt.adapters import LoraConfig, add_lora, lora_parameters, save_adapter


class HashLoraFactory:
    """``factory(description, seed) -> folder`` of a rank-``rank`` LoRA drawn from a hash.

    Args:
        registry: the served :class:`~ryzen_opt.adapters.AdapterRegistry` (its model's
            shapes are copied once; the served model is never changed).
        workdir: where the adapter folders go.
        rank: LoRA rank.
        std: standard deviation of the drawn A and B entries.
    """

    def __init__(self, registry, workdir: str | Path, rank: int = 4, std: float = 0.05) -> None:
        self.workdir = Path(workdir)
        self.rank = rank
        self.std = std
        self._lock = threading.Lock()
        template = copy.deepcopy(registry.model)
        self._model = add_lora(template, LoraConfig(rank=rank, alpha=2 * rank), name="hashed")
        self._params = list(lora_parameters(self._model, "hashed"))
        self.calls = 0

    def __call__(self, description: str, seed: int) -> Path:
        key = hashlib.blake2b(f"{seed}\0{description}".encode(), digest_size=8).digest()
        h = int.from_bytes(key, "little") & (2**63 - 1)
        folder = self.workdir / f"hashed-{h:016x}"
        with self._lock:
            self.calls += 1
            if (folder / "adapter_model.safetensors").is_file():
                return folder
            g = torch.Generator().manual_seed(h)
            with torch.no_grad():
                for p in self._params:
                    p.copy_(torch.randn(p.shape, generator=g) * self.std)
            return save_adapter(self._model, folder, name="hashed")
