"""The CPU fast path: the whole ``SimpleTransformerModel`` decode step in one Numba call.

``numba_fused_decode[serial]`` / ``numba_fused_decode[pool]`` (CPU, float32): one Numba call
per token runs every layer (:mod:`ryzen_opt.kernels.numba.decode_step`), reading the weights
from one arena laid out in :data:`~ryzen_opt.optimization.fastpaths.layout.STM_LAYOUT` order
and writing a preallocated KV cache; ``serial`` stays on the calling thread, ``pool`` spreads
each matmul over Numba's threads. Greedy ``generate`` runs its whole token loop, argmax and
``eos_id`` included, in one Numba call. Unmerged LoRA adapters (one active, or one per row)
are added inside the same call (:mod:`ryzen_opt.optimization.fastpaths.lora`).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn as nn

from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.optimization.fastpaths.layout import (
    GLOBAL_PARAMS,
    LAYER_PARAMS,
    Binding,
    param_slots,
    served_reason,
)
from ryzen_opt.optimization.fastpaths.lora import LoraTables
from ryzen_opt.optimization.kvcache import StaticKVCache


class _Arena:
    """Every parameter of the model in one float32 tensor; the Parameters become views of it.

    The model's ``state_dict`` keys and values are unchanged (a tied head stays tied: one
    Parameter, one slot). Memory does not grow: the old storages are released.
    """

    def __init__(self, model: SimpleTransformerModel) -> None:
        slots = param_slots(model)
        offsets: dict[int, int] = {}
        unique: list[nn.Parameter] = []
        total = 0
        for _, mod, attr in slots:
            p = mod._parameters[attr]
            if id(p) not in offsets:
                offsets[id(p)] = total
                unique.append(p)
                total += p.numel()
        flat = torch.empty(total, dtype=torch.float32)
        with torch.no_grad():
            for p in unique:
                o = offsets[id(p)]
                view = flat[o : o + p.numel()].view_as(p)
                view.copy_(p.detach())
                p.data = view
        self.flat = flat
        self.array = flat.numpy()
        n_layer = len(LAYER_PARAMS)
        ids = [offsets[id(mod._parameters[attr])] for _, mod, attr in slots]
        n_layers = len(model.blocks)
        self.layer_offsets = np.array(ids[: n_layers * n_layer], dtype=np.int64).reshape(
            n_layers, n_layer
        )
        self.global_offsets = np.array(ids[n_layers * n_layer :], dtype=np.int64)
        assert len(self.global_offsets) == len(GLOBAL_PARAMS)
        self.binding = Binding(model)
        from ryzen_opt.kernels.numba.decode_step import MAX_LORA_RANK

        self.lora = LoraTables(model, MAX_LORA_RANK)


class NumbaFusedDecode:
    """One Numba call per decode step (see the module docstring).

    Args:
        mode: ``"serial"`` (calling thread only) or ``"pool"`` (Numba's thread pool, sized
            like torch's).
    """

    kind = "decode"
    serves_lora = True  # unmerged adapters are added inside the step

    def __init__(self, mode: str) -> None:
        if mode not in ("serial", "pool"):
            raise ValueError(f"mode must be 'serial' or 'pool', got {mode!r}")
        self.mode = mode
        self.name = f"numba_fused_decode[{mode}]"
        self._workspaces: dict[tuple[int, int], np.ndarray] = {}

    def why_not(self, model: nn.Module) -> str | None:
        reason = served_reason(model, "cpu", "the fused Numba step runs on cpu")
        if reason is not None:
            return reason
        if any(p.dtype != torch.float32 for p in model.parameters()):
            return "the fused Numba step is float32 only"
        try:
            from ryzen_opt.kernels.numba import decode_step  # noqa: F401
        except Exception as e:  # numba missing or broken: the reason goes into the report
            return f"numba unavailable: {type(e).__name__}: {e}"
        return None

    def prepare(self, model: SimpleTransformerModel) -> None:
        """Lay the weights out in the arena (shared by both modes; redone when stale)."""
        arena = model.__dict__.get("_ryzen_arena")
        if arena is None or not arena.binding.current():
            model.__dict__["_ryzen_arena"] = _Arena(model)

    def adopt(self, model: SimpleTransformerModel, cache) -> StaticKVCache:
        """``cache`` (tuple-like) as a static cache this path can step from."""
        if isinstance(cache, StaticKVCache) and self._usable(cache):
            return cache
        return StaticKVCache.from_cache(cache, model.config.max_seq_len)

    @staticmethod
    def _usable(cache: StaticKVCache) -> bool:
        return cache.buffer.arrays is not None and cache.writable()

    def _workspace(self, cfg, b: int) -> np.ndarray:
        # Per (thread, batch): concurrent callers never share one; sized once, not per step.
        key = (threading.get_ident(), b)
        ws = self._workspaces.get(key)
        if ws is None:
            from ryzen_opt.kernels.numba.decode_step import workspace_size

            size = workspace_size(b, cfg.embedding_dim, cfg.ff_dim, cfg.num_heads, cfg.max_seq_len)
            ws = self._workspaces[key] = np.empty(size, dtype=np.float32)
        return ws

    def kernel_args(self, model: SimpleTransformerModel, b: int) -> tuple:
        """The fused kernels' arguments that do not change per step, around the per-step ones:
        ``(weights..., eps)`` and ``(workspace, threads)`` for ``b`` rows."""
        from ryzen_opt.kernels.numba._common import set_threads

        arena = self._arena(model)
        cfg = model.config
        head = (
            arena.array,
            arena.layer_offsets,
            arena.global_offsets,
            cfg.num_heads,
            cfg.ff_dim,
            model.ln_f.eps,
        )
        return head, (self._workspace(cfg, b), set_threads() if self.mode == "pool" else 1)

    def _arena(self, model: SimpleTransformerModel) -> _Arena:
        arena = model.__dict__.get("_ryzen_arena")
        if arena is None or not arena.binding.current():
            self.prepare(model)
            arena = model.__dict__["_ryzen_arena"]
        return arena

    def _lora(self, model: SimpleTransformerModel, b: int) -> tuple:
        from ryzen_opt.kernels.numba.decode_step import NO_LORA

        return self._arena(model).lora.get(b, NO_LORA)

    def greedy(
        self,
        model: SimpleTransformerModel,
        first: torch.Tensor,
        kv_cache,
        past_len: int,
        steps: int,
        eos_id: int | None = None,
    ) -> torch.Tensor:
        """Up to ``steps`` greedy tokens after ``first`` (``(batch,)``, fed at ``past_len``) in
        one Numba call: the step, the argmax, ``eos_id``'s stopping rule and the feedback all
        stay compiled. Fewer columns come back when every row stopped early."""
        from ryzen_opt.kernels.numba.decode_step import greedy_steps

        b = first.shape[0]
        head, tail = self.kernel_args(model, b)
        cache = self.adopt(model, kv_cache)
        ids = first.to(torch.int64).reshape(b).clone()
        out = torch.empty((b, steps), dtype=torch.int64)
        logits = torch.empty((b, model.config.vocab_size), dtype=torch.float32)
        k_arr, v_arr = cache.buffer.arrays
        ran = greedy_steps(
            *head, ids.numpy(), past_len, steps, k_arr, v_arr, logits.numpy(), *tail,
            out.numpy(), eos_id, self._lora(model, b),
        )  # fmt: skip
        return out[:, :ran]

    def __call__(self, model: SimpleTransformerModel, idx: torch.Tensor, kv_cache, past_len: int):
        # Every line here runs once per token: each costs microseconds against a ~150 us step.
        from ryzen_opt.kernels.numba.decode_step import decode_step

        b = idx.shape[0]
        head, tail = self.kernel_args(model, b)
        cache = self.adopt(model, kv_cache)
        if idx.dtype != torch.int64 or not idx.is_contiguous():
            idx = idx.to(torch.int64).contiguous()
        logits = torch.empty((b, 1, model.config.vocab_size), dtype=torch.float32)
        k_arr, v_arr = cache.buffer.arrays
        decode_step(
            *head, idx.numpy().reshape(b), past_len, k_arr, v_arr,
            logits.numpy().reshape(b, -1), *tail, self._lora(model, b),
        )  # fmt: skip
        return logits, cache.advanced()
