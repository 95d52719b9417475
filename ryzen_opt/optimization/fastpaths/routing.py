"""Routing a ``SimpleTransformerModel``'s calls to the fast paths ``optimize()`` installed.

:data:`PATHS` names every fast path (:data:`FAST_PATHS`, the names ``OptimizeConfig`` takes)
with the factory that makes a fresh one. Installing switches the model's class to
:class:`FastPathTransformer` (a subclass: same ``state_dict`` keys, same
``forward``/``generate`` contract), which routes the served shapes (:class:`FastPaths`) to
the fast path and everything else to the ordinary code.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.optimization.fastpaths.cpu import NumbaFusedDecode
from ryzen_opt.optimization.fastpaths.cuda_graph import (
    CudaGraphDecode,
    CudaGraphPrefill,
    TritonGraphDecode,
)
from ryzen_opt.optimization.fastpaths.layout import ModuleTree
from ryzen_opt.optimization.fastpaths.lora import is_lora, lora_needs_delta

# Every fast path by name, with the factory of a fresh one (a path holds per-model state:
# workspaces, captured graphs).
PATHS: dict[str, Callable[[], Any]] = {
    "numba_fused_decode[serial]": lambda: NumbaFusedDecode("serial"),
    "numba_fused_decode[pool]": lambda: NumbaFusedDecode("pool"),
    "cuda_graph_decode": CudaGraphDecode,
    "triton_graph_decode": TritonGraphDecode,
    "cuda_graph_prefill": CudaGraphPrefill,
}
FAST_PATHS = tuple(PATHS)


def make_path(name: str):
    """A fresh fast path by name (one of :data:`FAST_PATHS`)."""
    factory = PATHS.get(name)
    if factory is None:
        raise ValueError(f"unknown fast path {name!r}; known: {FAST_PATHS}")
    return factory()


def _no_autograd(model: SimpleTransformerModel) -> bool:
    return not (torch.is_grad_enabled() and model.tok_emb.weight.requires_grad)


class FastPaths:
    """The installed fast paths of one model and the shapes each serves.

    Args:
        decode: ``(lowest batch, highest batch, path)`` ranges, from measured batches.
        prefill: ``{(batch, seq): path}`` for measured prefill shapes.
    """

    def __init__(
        self,
        decode: list[tuple[int, int, Any]] | None = None,
        prefill: dict[tuple[int, int], Any] | None = None,
    ) -> None:
        self.decode = list(decode or [])
        self.prefill = dict(prefill or {})
        self.tree: ModuleTree | None = None  # set by install()
        self.loras: list[torch.nn.Module] = []  # the model's LoRA layers (install())
        self.warned = False
        # One-token decode calls (and greedy-loop tokens) by who computed them: a fast path,
        # or the model's own code (no path for the shape, a path that declined, training,
        # autograd, changed modules). What ran, not only what was chosen.
        self.decode_steps = {"fast": 0, "model": 0}

    def unchanged(self) -> bool:
        """Whether the model's modules are the ones the paths were installed over (else the
        model's own code runs, and a warning says so once)."""
        if self.tree is None or self.tree.same():
            return True
        if not self.warned:
            self.warned = True
            warnings.warn(
                "the model's modules changed after optimize() (e.g. LoRA layers added): its "
                "fast paths are off and the model's own code runs; call optimize() again",
                stacklevel=4,
            )
        return False

    def describe(self) -> list[str]:
        out = [f"decode batch {lo}-{hi}: {p.name}" for lo, hi, p in self.decode]
        out += [f"prefill {b}x{t}: {p.name}" for (b, t), p in self.prefill.items()]
        return out

    def decode_path(self, batch: int):
        """The decode fast path serving ``batch`` rows, or ``None``."""
        for lo, hi, path in self.decode:
            if lo <= batch <= hi:
                return path
        return None

    def greedy(
        self,
        model: SimpleTransformerModel,
        idx: torch.Tensor,
        max_new_tokens: int,
        eos_id: int | None = None,
    ):
        """``generate(idx, max_new_tokens, eos_id=eos_id)`` under greedy decoding with the whole
        token loop in the decode path (one call for every step), or ``None`` if that path has
        no such loop (then ``generate`` runs its ordinary per-token loop over the same step).

        The caller has validated the arguments (``_check_generation``); the prompt runs
        through :meth:`run`'s routing.
        """
        path = self.decode_path(idx.shape[0])
        if path is None or not hasattr(path, "greedy") or max_new_tokens < 2:
            return None  # (generate never records autograd: no autograd check here)
        if not self.unchanged() or not self._serves_lora(path):
            return None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits, cache = model._forward(idx, None, 0)
                first = logits[:, -1].argmax(dim=-1)
                if eos_id is not None and bool((first == eos_id).all()):
                    return torch.cat([idx, first[:, None]], dim=1)  # every row stopped at once
                rest = path.greedy(
                    model, first, cache, idx.shape[1], max_new_tokens - 1, eos_id=eos_id
                )
        finally:
            model.train(was_training)
        if rest is None:  # the path declined (its buffer is in use): the ordinary loop
            return None
        self.decode_steps["fast"] += rest.shape[1]
        return torch.cat([idx, first[:, None], rest.to(first.device)], dim=1)

    def run(self, model: SimpleTransformerModel, idx: torch.Tensor, kv_cache, past_len: int):
        """The fast path's ``(logits, cache)`` for this call, or ``None`` to run the model."""
        out = self._run(model, idx, kv_cache, past_len)
        if kv_cache is not None and idx.shape[1] == 1:
            self.decode_steps["fast" if out is not None else "model"] += 1
        return out

    def _run(self, model: SimpleTransformerModel, idx: torch.Tensor, kv_cache, past_len: int):
        if model.training or not _no_autograd(model) or not self.unchanged():
            return None
        if kv_cache is None:
            path = self.prefill.get((idx.shape[0], idx.shape[1]))
            if path is None or not self._serves_lora(path):
                return None
            return path(model, idx, None, 0)
        if idx.shape[1] != 1 or past_len >= model.config.max_seq_len:
            return None
        path = self.decode_path(idx.shape[0])
        if path is None or not self._serves_lora(path):
            return None
        return path(model, idx, kv_cache, past_len)

    def _serves_lora(self, path) -> bool:
        """A path that does not add LoRA updates runs only while no LoRA layer needs one
        (merged adapters are in the weights it reads)."""
        return getattr(path, "serves_lora", False) or not any(map(lora_needs_delta, self.loras))


class FastPathTransformer(SimpleTransformerModel):
    """A ``SimpleTransformerModel`` whose measured shapes run a model-level fast path.

    ``optimize()`` switches a model to this class when a fast path won; its parameters,
    ``state_dict`` keys, ``forward``/``generate`` contract and outputs (within the dtype
    tolerance) are the original's. Calls outside the served shapes, in training mode or
    with autograd on run the ordinary code. The KV cache it returns from a fast step is a
    :class:`~ryzen_opt.optimization.kvcache.StaticKVCache`, which indexes like the tuple
    cache.
    """

    def _forward(self, idx, kv_cache, past_len):
        paths = self.__dict__.get("_fast_paths")
        if paths is not None:
            out = paths.run(self, idx, kv_cache, past_len)
            if out is not None:
                return out
        return super()._forward(idx, kv_cache, past_len)

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """As ``SimpleTransformerModel.generate``; greedy decoding runs the whole token loop
        (``eos_id`` included) in the decode fast path where it has one (the fused Numba step)."""
        paths = self.__dict__.get("_fast_paths")
        if paths is not None and temperature == 0 and use_cache:
            self._check_generation(idx, max_new_tokens, temperature, top_k, top_p, eos_id, seed)
            out = paths.greedy(self, idx, max_new_tokens, eos_id)
            if out is not None:
                return out
        return super().generate(
            idx, max_new_tokens, temperature, top_k, top_p, eos_id, seed, use_cache
        )


def install(model: SimpleTransformerModel, paths: FastPaths) -> Callable[[], None]:
    """Route ``model``'s served shapes to ``paths``; returns the undo function."""
    old_cls = model.__class__
    old = model.__dict__.get("_fast_paths")
    paths.tree = ModuleTree(model)
    paths.loras = [m for m in model.modules() if is_lora(m)]
    model.__class__ = FastPathTransformer
    model.__dict__["_fast_paths"] = paths

    def undo() -> None:
        model.__class__ = old_cls
        if old is None:
            model.__dict__.pop("_fast_paths", None)
        else:
            model.__dict__["_fast_paths"] = old

    return undo


def batch_ranges(measured, winners: dict) -> list[tuple[int, int, Any]]:
    """``(lowest, highest, winner)`` batch ranges: a batch between two measured ones that
    both won runs the lower one's winner; nothing outside the measured range is routed."""
    out = []
    ms = sorted(measured)
    for i, b in enumerate(ms):
        if b not in winners:
            continue
        nxt = ms[i + 1] if i + 1 < len(ms) else None
        hi = nxt - 1 if nxt is not None and nxt in winners else b
        out.append((b, hi, winners[b]))
    return out
