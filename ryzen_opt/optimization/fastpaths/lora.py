"""LoRA layers and the fast paths: what every path needs to know of them, and the updates
inside the fused decode step of the ``SimpleTransformerModel`` family.

:func:`base_of` gives the module a fused step reads weights from (a LoRA layer's base: a
merged adapter is in those weights); :func:`lora_needs_delta` says whether a layer adds an
update now, which a path that does not add LoRA updates must not skip (the routers then run
the model's own code). The Hugging Face decode loops add none yet.

A seed model with LoRA layers (:mod:`ryzen_opt.adapters`) keeps its fast paths: merged or
inactive layers compute their base exactly, and the base weights are what the fused step
reads. Unmerged adapters (one active adapter, or a mixed batch where each row has its own)
add ``scaling * B (A x)`` to a linear's output: :func:`tables` turns the model's LoRA state
into the flat arrays and per-row tables that
:func:`ryzen_opt.kernels.numba.decode_step.decode_step` takes (``lora=``), and caches them
until an adapter is switched, merged, or its weights are edited. On CUDA,
:class:`DeviceLoraTables` keeps the same state in device tables of fixed addresses for the
Triton decode step (:func:`ryzen_opt.kernels.triton.decode_step.decode_step`, ``lora=``)
replayed from a CUDA graph: a switch rewrites the tables, never the graph.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

# The linears of a layer a LoRA adapter may wrap, in the fused step's order.
LORA_SLOTS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def is_lora(module: nn.Module) -> bool:
    """A LoRA layer (:class:`ryzen_opt.adapters.LoraLinear`): a ``base_layer`` and adapters."""
    return hasattr(module, "base_layer") and hasattr(module, "configs")


def base_of(module: nn.Module) -> nn.Module:
    """The module whose parameters a fused step reads: a LoRA layer's base, else itself."""
    return module.base_layer if is_lora(module) else module


def lora_needs_delta(layer: nn.Module) -> bool:
    """Whether a LoRA layer adds anything to its base's output now (an active unmerged
    adapter, or a mixed batch); merged or inactive layers compute exactly their base."""
    return layer._mixed is not None or (layer.active is not None and layer.merged is None)


def lora_layers(model: nn.Module) -> list[list[nn.Module | None]]:
    """Per block, the LoRA layer at each of :data:`LORA_SLOTS` (``None`` where the linear
    is not wrapped)."""
    out = []
    for blk in model.blocks:
        row = []
        for path in LORA_SLOTS:
            m = blk.get_submodule(path)
            row.append(m if is_lora(m) else None)
        out.append(row)
    return out


def _state(layer: nn.Module) -> tuple:
    """What the tables depend on: the adapter state and the weights' versions."""
    if not lora_needs_delta(layer):
        return (None,)
    if layer._mixed is not None:
        a, b, s, idx = layer._mixed
        return (id(layer._mixed), a._version, b._version, s._version, idx._version)
    name = layer.active
    a, b = layer._parameters[f"lora_A__{name}"], layer._parameters[f"lora_B__{name}"]
    return (name, layer.configs[name].scaling, id(a), a._version, id(b), b._version)


def _updates(layer: nn.Module, batch: int):
    """``(A (rank, in), B (out, rank), scaling, rows)`` of each adapter the batch uses."""
    if layer._mixed is not None:
        a, b, scales, idx = layer._mixed
        if idx.shape[0] != batch:
            raise ValueError(
                f"mixed batch: {idx.shape[0]} adapter indices for a decode batch of {batch}"
            )
        for i in sorted({int(v) for v in idx.tolist() if v >= 0}):
            rows = [r for r in range(batch) if int(idx[r]) == i]
            yield a[i], b[i], float(scales[i]), rows
        return
    name = layer.active
    a, b = layer._parameters[f"lora_A__{name}"], layer._parameters[f"lora_B__{name}"]
    yield a, b, layer.configs[name].scaling, range(batch)


def tables(layers: list[list[nn.Module | None]], batch: int, max_rank: int):
    """``(lora_a, lora_b, lora_t, lora_s)`` for ``batch`` rows (the decode step's ``lora``
    argument).

    Raises:
        ValueError: a rank above ``max_rank``, a mixed batch of another size, or LoRA
            weights that are not float32.
    """
    n_layers = len(layers)
    lt = np.zeros((n_layers, len(LORA_SLOTS), batch, 3), np.int64)
    ls = np.zeros((n_layers, len(LORA_SLOTS), batch), np.float32)
    parts_a: list[np.ndarray] = []
    parts_b: list[np.ndarray] = []
    oa = ob = 0
    for li, row in enumerate(layers):
        for si, layer in enumerate(row):
            if layer is None or not lora_needs_delta(layer):
                continue
            if layer.fan_in_fan_out:
                raise ValueError("LoRA on a Conv1D base is not served by the fused step")
            for a, b, scale, rows in _updates(layer, batch):
                rank = a.shape[0]
                if rank > max_rank:
                    raise ValueError(f"LoRA rank {rank} is above the fused step's {max_rank}")
                if a.dtype != torch.float32 or b.dtype != torch.float32:
                    raise ValueError(f"LoRA weights are {a.dtype}; the fused step reads float32")
                parts_a.append(a.detach().contiguous().numpy().ravel())
                parts_b.append(b.detach().t().contiguous().numpy().ravel())  # (rank, out)
                for r in rows:
                    lt[li, si, r] = (oa, ob, rank)
                    ls[li, si, r] = scale
                oa += parts_a[-1].size
                ob += parts_b[-1].size
    la = np.concatenate(parts_a) if parts_a else np.zeros(0, np.float32)
    lb = np.concatenate(parts_b) if parts_b else np.zeros(0, np.float32)
    return la, lb, lt, ls


class LoraTables:
    """The tables of one model, rebuilt only when its LoRA state changes (checked per call:
    a few attribute reads per LoRA layer; nothing at all for a model without one)."""

    def __init__(self, model: nn.Module, max_rank: int) -> None:
        self.layers = lora_layers(model)
        self.flat = [m for row in self.layers for m in row if m is not None]
        self.max_rank = max_rank
        self._key: tuple | None = None
        self._tables = None

    def get(self, batch: int, none):
        """The tables for ``batch`` rows, or ``none`` when no layer adds anything."""
        if not self.flat:
            return none
        key = (batch, *map(_state, self.flat))
        if key != self._key:
            if all(k == (None,) for k in key[1:]):
                self._tables = none
            else:
                self._tables = tables(self.layers, batch, self.max_rank)
            self._key = key
        return self._tables


def _pow2_at_least(n: int, floor: int) -> int:
    m = floor
    while m < n:
        m *= 2
    return m


def _capacity(flat: list[nn.Module]) -> tuple[int, int]:
    """Adapters and rank the device tables must hold for every adapter the layers have."""
    n = max((len(layer.configs) for layer in flat), default=1)
    r = max((c.rank for layer in flat for c in layer.configs.values()), default=1)
    return _pow2_at_least(n, 1), _pow2_at_least(r, 8)


class DeviceLoraTables:
    """Unmerged LoRA updates of one batch size, as the Triton decode step reads them.

    One :class:`~ryzen_opt.kernels.triton.decode_step.LoraSlot` per wrapped linear, allocated
    once for every adapter the model holds (a CUDA graph captures their addresses);
    :meth:`sync` rewrites their contents when an adapter is switched, merged, unmerged, a mixed
    batch starts or ends, or LoRA weights are edited (device-to-device copies, no host sync),
    and returns ``False`` when the model now holds more adapters, or a larger rank, than the
    tables were sized for (the caller then builds new tables and recaptures).
    """

    def __init__(self, model: nn.Module, batch: int) -> None:
        from ryzen_opt.kernels.triton.decode_step import LoraSlot

        self.layers = lora_layers(model)
        self.flat = [m for row in self.layers for m in row if m is not None]
        self.batch = batch
        self.adapters, self.max_rank = _capacity(self.flat)
        self.slots: dict[tuple[int, str], LoraSlot] = {}
        self._by_slot: list[tuple[nn.Module, LoraSlot]] = []
        for i, row in enumerate(self.layers):
            for name, layer in zip(LORA_SLOTS, row, strict=True):
                if layer is None:
                    continue
                w = layer.base_layer.weight
                dev = w.device

                def zeros(*shape, dtype=w.dtype, dev=dev):
                    return torch.zeros(shape, dtype=dtype, device=dev)

                slot = LoraSlot(
                    a=zeros(self.adapters, self.max_rank, layer.in_features),
                    bt=zeros(self.adapters, self.max_rank, layer.out_features),
                    scale=zeros(self.adapters, dtype=torch.float32),
                    rows=torch.full((batch,), -1, dtype=torch.int32, device=dev),
                    rank=zeros(1, dtype=torch.int32),
                )
                self.slots[(i, name)] = slot
                self._by_slot.append((layer, slot))
        self._key: tuple | None = None

    def fits(self) -> bool:
        """Whether every adapter the layers hold now fits the tables."""
        n, r = _capacity(self.flat)
        return n <= self.adapters and r <= self.max_rank

    @torch.no_grad()
    def sync(self) -> bool:
        """Bring the tables up to the layers' state; ``False`` if they no longer fit."""
        key = tuple(map(_state, self.flat))
        if key == self._key:
            return True
        if not self.fits():
            return False
        for layer, slot in self._by_slot:
            if not lora_needs_delta(layer):
                slot.rows.fill_(-1)
                continue
            if layer.fan_in_fan_out:
                raise ValueError("LoRA on a Conv1D base is not served by the fused step")
            if layer._mixed is not None:
                a, b, scales, rows = layer._mixed
                if rows.shape[0] != self.batch:
                    raise ValueError(
                        f"mixed batch: {rows.shape[0]} adapter indices for a decode batch of "
                        f"{self.batch}"
                    )
                n, r = a.shape[0], a.shape[1]
                slot.a[:n, :r].copy_(a)
                slot.bt[:n, :r].copy_(b.transpose(1, 2))
                slot.scale[:n].copy_(scales)
                slot.rows.copy_(rows)
            else:
                name = layer.active
                a = layer._parameters[f"lora_A__{name}"]
                b = layer._parameters[f"lora_B__{name}"]
                r = a.shape[0]
                slot.a[0, :r].copy_(a)
                slot.bt[0, :r].copy_(b.t())
                slot.scale[0] = layer.configs[name].scaling
                slot.rows.fill_(0)
            slot.rank.fill_(r)
        self._key = key
        return True
