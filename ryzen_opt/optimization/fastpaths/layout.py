"""The ``SimpleTransformerModel`` weight layout that the fused decode-step kernels read.

The Numba step (:mod:`ryzen_opt.kernels.numba.decode_step`) and the Triton step
(:mod:`ryzen_opt.kernels.triton.decode_step`) do not walk the module tree: they read every
parameter through a table, in a fixed order. :data:`STM_LAYOUT` is that order, written once:
the per-layer parameters (names relative to ``blocks.<i>.``, the columns of the Numba step's
``layer_offsets`` table) and the model-level ones (its ``global_offsets`` table).

:func:`structure_reason` says whether a model computes what the kernels assume of that
layout (the fast paths re-implement the forward), and :class:`Binding` notices when the
parameter objects the kernels were prepared from have been replaced. The Hugging Face
decoders have their own contract in :mod:`ryzen_opt.optimization.fastpaths.decoder_layout`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn

from ryzen_opt.models.model import MLP, CausalSelfAttention, SimpleTransformerModel
from ryzen_opt.optimization.fastpaths.lora import base_of


@dataclass(frozen=True)
class WeightLayout:
    """The order in which a fused step reads a model's parameters.

    Args:
        layer: parameter names relative to ``blocks.<i>.``, one table row per layer.
        model: model-level parameter names, after every layer's.
    """

    layer: tuple[str, ...]
    model: tuple[str, ...]

    def names(self, num_layers: int) -> list[str]:
        """Every parameter name, in table order: layer 0's, layer 1's, ..., then the model's."""
        out = [f"blocks.{i}.{p}" for i in range(num_layers) for p in self.layer]
        return out + list(self.model)

    def slots(self, model: nn.Module) -> list[tuple[str, nn.Module, str]]:
        """``(name, owning module, attribute)`` of every parameter, in table order (a LoRA
        layer's parameters are its base layer's)."""
        out = []
        for name in self.names(len(model.blocks)):
            path, _, attr = name.rpartition(".")
            out.append((name, base_of(model.get_submodule(path)), attr))
        return out


STM_LAYOUT = WeightLayout(
    layer=(
        "ln1.weight",
        "ln1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "ln2.weight",
        "ln2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ),
    model=("tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias", "head.weight"),
)
LAYER_PARAMS = STM_LAYOUT.layer
GLOBAL_PARAMS = STM_LAYOUT.model


def param_slots(model: SimpleTransformerModel) -> list[tuple[str, nn.Module, str]]:
    """``(name, owning module, attribute)`` of every parameter a fast path reads."""
    return STM_LAYOUT.slots(model)


def structure_reason(model: nn.Module) -> str | None:
    """``None`` if ``model`` computes exactly what ``SimpleTransformerModel`` does, else why not.

    The fast paths re-implement the forward, so they serve only modules whose computation is
    known: the baseline's (or ``optimize()``'s drop-in replacements of) attention, MLP with
    exact GELU, LayerNorm with weight and bias, and a bias-free head.
    """
    from ryzen_opt.optimization.modules import FusedMLP, OptimizedSelfAttention

    if not isinstance(model, SimpleTransformerModel):
        return f"{type(model).__name__} is not a SimpleTransformerModel"
    cfg = model.config
    norms = [model.ln_f] + [n for b in model.blocks for n in (b.ln1, b.ln2)]
    for n in norms:
        if not isinstance(n, nn.LayerNorm) or n.weight is None or n.bias is None:
            return "a LayerNorm without weight and bias"
        if n.normalized_shape != (cfg.embedding_dim,) or n.eps != norms[0].eps:
            return "LayerNorms with different shapes or eps"
    for i, b in enumerate(model.blocks):
        if type(b.attn) not in (CausalSelfAttention, OptimizedSelfAttention):
            return f"blocks.{i}.attn is a {type(b.attn).__name__}"
        mlp = b.mlp
        exact_gelu = type(mlp) is MLP or (
            type(mlp) is FusedMLP and getattr(mlp.fc1, "activation", None) == "gelu"
        )
        if not exact_gelu:
            return f"blocks.{i}.mlp is a {type(mlp).__name__} with an unknown activation"
        for lin in (b.attn.qkv, b.attn.proj, mlp.fc1, mlp.fc2):
            lin = base_of(lin)
            if not isinstance(lin, nn.Linear) or lin.bias is None:
                return f"blocks.{i} has a Linear without bias"
    if model.head.bias is not None:
        return "the head has a bias"
    return None


def served_reason(model: nn.Module, device_type: str, needs: str) -> str | None:
    """:func:`structure_reason`, then whether the model is on ``device_type`` (``needs``: why
    the path needs it, the end of the message)."""
    reason = structure_reason(model)
    if reason is None and model.tok_emb.weight.device.type != device_type:
        reason = f"the model is on {model.tok_emb.weight.device}, {needs}"
    return reason


class ModuleTree:
    """The modules that hold a model's parameters, where they were when a fast path was
    installed: a fast path re-implements the forward, so a module swapped in afterwards (a
    LoRA layer wrapping a linear, a user's patch) would be silently skipped. :meth:`same`
    tells; the routers run the model's own code when it says no.

    Checked per call: one identity test per parameter-holding module (a few microseconds).
    """

    def __init__(self, model: nn.Module) -> None:
        self.dicts, self.names, self.children = [], [], []
        for parent in model.modules():
            for name, child in parent._modules.items():
                if child is not None and child._parameters:
                    self.dicts.append(parent._modules)
                    self.names.append(name)
                    self.children.append(child)

    def same(self) -> bool:
        return all(map(operator.is_, map(dict.get, self.dicts, self.names), self.children))


class Binding:
    """The parameter objects a fast path was built from, to notice when they change.

    ``load_state_dict`` writes into the same storage (nothing to notice); ``.to()``,
    ``.half()`` or assigning a new ``Parameter`` replace it, and then the path is rebuilt.
    Checked on every step, so it is written for speed (~24 parameters, a few microseconds).
    """

    def __init__(self, model: SimpleTransformerModel) -> None:
        slots = param_slots(model)
        self.dicts = [mod._parameters for _, mod, _ in slots]
        self.attrs = [attr for _, _, attr in slots]
        self.params = [d[a] for d, a in zip(self.dicts, self.attrs, strict=True)]
        self.ptrs = [p.data_ptr() for p in self.params]

    def current(self) -> bool:
        return all(map(operator.is_, map(dict.get, self.dicts, self.attrs), self.params)) and (
            list(map(torch.Tensor.data_ptr, self.params)) == self.ptrs
        )
