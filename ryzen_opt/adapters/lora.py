"""LoRA layers: ``add_lora`` wraps a model's targeted linears, keeping their base weights.

A wrapped layer (:class:`LoraLinear`) holds the original module as ``base_layer`` (its weight
is the same ``Parameter`` object, frozen and never reallocated) and any number of named
adapters. It runs in one of three ways:

* unmerged: ``base(x) + scaling * B(A(dropout(x)))`` for the active adapter (or ``base(x)``
  with none active). Switching adapters changes a name; no weight is copied or allocated.
* merged: the active adapter is folded into the base weight in place
  (``W += scaling * B @ A``), so a forward costs exactly the base model's. Unmerging restores
  the base weight **from an exact copy** taken when merging (kept in ``_backup`` and reused
  by later merges), not by subtracting the update again: ``fl(fl(W + d) - d) != W`` in
  general, while a copy restores the base logits bit for bit.
* mixed batch: row ``i`` of the batch uses adapter ``indices[i]`` (``-1``: none), through
  :func:`lora_bgmv`, the one function a fused kernel will replace.

Layers are ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored ``(in, out)``, PEFT's
``fan_in_fan_out``); ``A`` is always ``(rank, in)`` and ``B`` ``(out, rank)``, as in PEFT.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ryzen_opt.adapters.config import AdapterError, LoraConfig
from ryzen_opt.models.config import short_repr


def lora_bgmv(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The LoRA update of a mixed batch: row ``i`` gets ``scales[k] * b[k] @ a[k] @ x[i]``.

    :func:`ryzen_opt.kernels.lora_bgmv` (``backend="auto"``: the kernel measured fastest for
    the shape where a decision was recorded, else the PyTorch reference; ``"numba"`` /
    ``"triton"`` ask for a kernel).

    Args:
        x: ``(rows, in)`` inputs.
        a: ``(n_adapters, rank, in)`` stacked ``lora_A`` weights (a smaller rank zero-padded).
        b: ``(n_adapters, out, rank)`` stacked ``lora_B`` weights.
        scales: ``(n_adapters,)`` each adapter's ``alpha / rank``.
        indices: ``(rows,)`` int64 adapter of each row, ``-1`` for none.
        backend: the kernel backend (see above).

    Returns:
        ``(rows, out)`` the update to add to the base layer's output (zeros where
        ``indices == -1``).

    Example:
        >>> import torch
        >>> from ryzen_opt.adapters import lora_bgmv
        >>> x, a, b = torch.randn(3, 4), torch.randn(2, 2, 4), torch.randn(2, 5, 2)
        >>> d = lora_bgmv(x, a, b, torch.tensor([1.0, 0.5]), torch.tensor([0, -1, 1]))
        >>> d.shape, bool(d[1].eq(0).all())
        (torch.Size([3, 5]), True)
    """
    from ryzen_opt import kernels

    return kernels.lora_bgmv(x, a, b, scales, indices, backend=backend)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D (x @ W + b, W of shape (in, out)); matched by name so that
    # this module does not import transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def supported(module: nn.Module) -> bool:
    """True iff ``module`` can carry LoRA adapters here (``nn.Linear``, GPT-2 ``Conv1D``)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class LoraLinear(nn.Module):
    """A linear layer with named LoRA adapters around an untouched ``base_layer``.

    Built by :func:`add_lora`; see the module docstring for the three ways it runs.

    Args:
        base: the ``nn.Linear`` or GPT-2 ``Conv1D`` to wrap; its parameters are frozen.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not supported(base):
            raise AdapterError(f"base must be an nn.Linear or Conv1D, got {type(base).__name__}")
        self.base_layer = base
        self.fan_in_fan_out = _is_conv1d(base)
        w = base.weight
        self.in_features, self.out_features = (
            (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        )
        for p in base.parameters():
            p.requires_grad_(False)
        # Parameters are registered as ``lora_A__<name>`` / ``lora_B__<name>``, not in a
        # ParameterDict: its keys share the namespace of its methods, so an adapter named
        # "copy" or "update" could not be added.
        self.configs: dict[str, LoraConfig] = {}
        self.active: str | None = None
        self.merged: str | None = None
        self._backup: torch.Tensor | None = None  # the exact base weight while merged
        self._mixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.train(base.training)  # a wrapper made for an eval-mode model stays in eval mode

    def add(self, name: str, config: LoraConfig, init: bool = True) -> None:
        """Add adapter ``name`` (``A`` Kaiming-uniform and ``B`` zeros if ``init``)."""
        w = self.base_layer.weight
        a = torch.empty(config.rank, self.in_features, dtype=w.dtype, device=w.device)
        b = torch.zeros(self.out_features, config.rank, dtype=w.dtype, device=w.device)
        if init:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's init of lora_A
        self.register_parameter(f"lora_A__{name}", nn.Parameter(a))
        self.register_parameter(f"lora_B__{name}", nn.Parameter(b))
        self.configs[name] = config

    @property
    def lora_A(self) -> dict[str, nn.Parameter]:
        """``{adapter: A}``, each ``(rank, in)``."""
        return {n: self._parameters[f"lora_A__{n}"] for n in self.configs}

    @property
    def lora_B(self) -> dict[str, nn.Parameter]:
        """``{adapter: B}``, each ``(out, rank)``."""
        return {n: self._parameters[f"lora_B__{n}"] for n in self.configs}

    def remove(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        if self.active == name:
            self.active = None
        del self._parameters[f"lora_A__{name}"], self._parameters[f"lora_B__{name}"]
        del self.configs[name]

    # -- merge -------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight in place (replacing a merged one)."""
        if self.merged == name:
            return
        w = self.base_layer.weight
        if self.merged is None:  # w holds the base weight: keep an exact copy for unmerge
            kept = self._backup
            if kept is None or (kept.dtype, kept.device, kept.shape) != (
                w.dtype,
                w.device,
                w.shape,
            ):
                self._backup = w.detach().clone()
            else:
                self._backup.copy_(w)
        a, b = self._parameters[f"lora_A__{name}"], self._parameters[f"lora_B__{name}"]
        s = self.configs[name].scaling
        # w = base + s * B @ A in one pass from the saved copy: a switch between merged
        # adapters needs no restore first (one write of w instead of two).
        if self.fan_in_fan_out:
            torch.addmm(self._backup, a.t(), b.t(), alpha=s, out=w)
        else:
            torch.addmm(self._backup, b, a, alpha=s, out=w)
        self.merged = self.active = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit from the copy taken by :meth:`merge`."""
        if self.merged is None:
            return
        self.base_layer.weight.copy_(self._backup)
        self.merged = None

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self._mixed is not None:
            a, b, scales, row_idx = self._mixed
            if x.dim() < 2 or x.shape[0] != row_idx.shape[0]:
                raise AdapterError(
                    f"mixed_batch was given {row_idx.shape[0]} adapters (one per row) but "
                    f"this forward has input of shape {tuple(x.shape)}"
                )
            per_row = x.numel() // max(x.shape[0] * x.shape[-1], 1) if x.dim() > 2 else 1
            idx = row_idx.repeat_interleave(per_row) if per_row != 1 else row_idx
            delta = lora_bgmv(x.reshape(-1, x.shape[-1]), a, b, scales, idx)
            return y + delta.reshape(y.shape)
        name = self.active
        if name is None or self.merged is not None:
            return y
        cfg = self.configs[name]
        h = F.dropout(x, cfg.dropout, self.training) if cfg.dropout else x
        a, b = self._parameters[f"lora_A__{name}"], self._parameters[f"lora_B__{name}"]
        return y + F.linear(F.linear(h, a), b) * cfg.scaling

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, adapters={list(self.configs)}, "
            f"active={self.active!r}, merged={self.merged!r}"
        )


# -- the model level ------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's LoRA layers by module path (``{"blocks.0.attn.qkv": LoraLinear, ...}``)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters the model holds, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.configs))
    return list(names)


def find_targets(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """The modules ``config`` targets, by path (a wrapped layer counts as its base).

    Raises:
        AdapterError naming ``target_modules``: a target matches a module LoRA cannot wrap,
        or the targets match no module at all.
    """
    out: dict[str, nn.Module] = {}
    for path, m in model.named_modules():
        if path.endswith(".base_layer") or ".lora_" in path or not config.targets(path):
            continue
        if not (isinstance(m, LoraLinear) or supported(m)):
            raise AdapterError(
                f"target_modules {list(config.target_modules)} match {path!r}, a "
                f"{type(m).__name__}; LoRA here wraps nn.Linear and GPT-2 Conv1D only"
            )
        out[path] = m
    if not out:
        linears = [p for p, m in model.named_modules() if supported(m)][:8]
        raise AdapterError(
            f"target_modules {list(config.target_modules)} match no module of the "
            f"{type(model).__name__} (some of its linear modules: {linears})"
        )
    return out


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise AdapterError(f"name must be a non-empty str without '.', got {short_repr(name)}")


def add_lora(
    model: nn.Module, config: LoraConfig, name: str = "default", *, init: bool = True
) -> nn.Module:
    """Add LoRA adapter ``name`` to the layers ``config`` targets, in place.

    Targeted ``nn.Linear`` / ``Conv1D`` modules are replaced by :class:`LoraLinear` wrappers
    (once; a later adapter joins the existing wrapper). The base weights stay the same
    ``Parameter`` objects, frozen. The new adapter is not activated: see
    :func:`set_adapter`.

    Args:
        model: any ``nn.Module`` (``SimpleTransformerModel``, an HF causal LM, ...).
        config: the adapter's :class:`LoraConfig`.
        name: the adapter's name, unique in the model.
        init: PEFT's initialisation (``A`` Kaiming-uniform, ``B`` zeros); ``False`` leaves
            ``A`` uninitialised for a caller that fills both (loading).

    Returns:
        ``model`` itself.

    Raises:
        AdapterError: the name exists or the targets match nothing LoRA can wrap.

    Example:
        >>> from ryzen_opt.adapters import LoraConfig, add_lora, set_adapter
        >>> from ryzen_opt.models import ModelConfig, SimpleTransformerModel
        >>> m = SimpleTransformerModel(ModelConfig(num_layers=1))
        >>> m = add_lora(m, LoraConfig(rank=4, target_modules=("qkv",)))
        >>> set_adapter(m, "default")
    """
    if not isinstance(model, nn.Module):
        raise AdapterError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"config must be a LoraConfig, got {type(config).__name__}")
    _check_name(name)
    if name in adapter_names(model):
        raise AdapterError(f"name {name!r}: the model already has an adapter of that name")
    targets = find_targets(model, config)
    for path, m in targets.items():
        layer = m
        if not isinstance(m, LoraLinear):
            layer = LoraLinear(m)
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, layer)
        layer.add(name, config, init=init)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Unmerge and drop every adapter, putting the original modules back; returns ``model``."""
    for path, layer in lora_layers(model).items():
        layer.unmerge()
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, layer.base_layer)
    return model


def _require(model: nn.Module, name: str) -> dict[str, LoraLinear]:
    layers = lora_layers(model)
    if not any(name in layer.configs for layer in layers.values()):
        raise AdapterError(f"adapter {name!r} is not in the model (it has {adapter_names(model)})")
    return layers


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter, unmerged (``None``: the base model).

    A merged adapter is unmerged first (exact restore of the base weight). Only names change:
    no weight is copied or allocated unless a merged one must be restored.

    Args:
        model: a model holding adapters (:func:`add_lora`, :func:`load_adapter`).
        name: the adapter to run with, or ``None`` for the base model.

    Raises:
        AdapterError: the model has no adapter ``name``.

    Example:
        >>> import torch
        >>> from ryzen_opt.adapters import LoraConfig, add_lora, merge_adapter, set_adapter
        >>> from ryzen_opt.models import ModelConfig, SimpleTransformerModel
        >>> m = add_lora(SimpleTransformerModel(ModelConfig(num_layers=1)), LoraConfig(), "a")
        >>> set_adapter(m, "a")        # unmerged: base(x) + scaling * B(A(x))
        >>> merge_adapter(m, "a")      # folded into the base weights
        >>> set_adapter(m, None)       # the base model, weights restored bit for bit
    """
    layers = lora_layers(model) if name is None else _require(model, name)
    activate_layers(layers.values(), name)


def activate_layers(layers: Iterable[LoraLinear], name: str | None) -> None:
    """:func:`set_adapter` on given layers (a caller that keeps the list skips the walk)."""
    for layer in layers:
        if layer.merged is not None:
            layer.unmerge()
        layer.active = name if name is not None and name in layer.configs else None


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into the base weights (zero-overhead serving).

    See :meth:`LoraLinear.merge`; layers without the adapter keep (or get back) their base
    weights. :func:`set_adapter` or :func:`unmerge_adapter` restore the base exactly.

    Args:
        model: a model holding adapter ``name``.
        name: the adapter to merge (replacing a merged one).

    Raises:
        AdapterError: the model has no adapter ``name``.

    Example:
        See :func:`set_adapter`.
    """
    merge_layers(_require(model, name).values(), name)


def merge_layers(layers: Iterable[LoraLinear], name: str) -> None:
    """:func:`merge_adapter` on given layers."""
    for layer in layers:
        if name in layer.configs:
            layer.merge(name)
        else:
            layer.unmerge()
            layer.active = None


def unmerge_adapter(model: nn.Module) -> None:
    """Restore every base weight exactly; the merged adapter stays active, unmerged."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter ``name`` (unmerging it first if it is merged); the wrappers stay.

    Raises:
        AdapterError: the model has no adapter ``name``.
    """
    for layer in _require(model, name).values():
        if name in layer.configs:
            layer.remove(name)


def _stack(layer: LoraLinear, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    # (a, b, scales) of ``names`` for this layer; an adapter it lacks or a smaller rank is
    # zero-padded, so its rows get a zero update.
    w = layer.base_layer.weight
    rank = max((layer.configs[n].rank for n in names if n in layer.configs), default=1)
    a = torch.zeros(len(names), rank, layer.in_features, dtype=w.dtype, device=w.device)
    b = torch.zeros(len(names), layer.out_features, rank, dtype=w.dtype, device=w.device)
    scales = torch.zeros(len(names), dtype=w.dtype, device=w.device)
    for i, n in enumerate(names):
        if n in layer.configs:
            r = layer.configs[n].rank
            a[i, :r] = layer.lora_A[n].detach()
            b[i, :, :r] = layer.lora_B[n].detach()
            scales[i] = layer.configs[n].scaling
    return a, b, scales


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapters: Sequence[str | None]) -> Iterator[None]:
    """Within the block, batch row ``i`` runs with adapter ``adapters[i]`` (``None``: base).

    Every forward inside must have ``len(adapters)`` rows (generation keeps the batch), and
    no adapter may be merged. Inference only: the LoRA dropout is not applied.

    Example:
        >>> import torch
        >>> from ryzen_opt.adapters import LoraConfig, add_lora, mixed_batch
        >>> from ryzen_opt.models import ModelConfig, SimpleTransformerModel
        >>> m = add_lora(SimpleTransformerModel(ModelConfig(num_layers=1)), LoraConfig(rank=4))
        >>> with mixed_batch(m, ["default", None]):
        ...     logits, _ = m(torch.tensor([[1, 2], [3, 4]]))
    """
    layers = lora_layers(model)
    names = [n for n in dict.fromkeys(adapters) if n is not None]
    for n in names:
        _require(model, n)
    if any(layer.merged is not None for layer in layers.values()):
        raise AdapterError("adapters: a mixed batch needs unmerged adapters; unmerge first")
    device = next(iter(layers.values())).base_layer.weight.device if layers else None
    index = {n: i for i, n in enumerate(names)}
    rows = torch.tensor([-1 if n is None else index[n] for n in adapters], device=device)
    try:
        for layer in layers.values():
            layer._mixed = (*_stack(layer, names), rows)
        yield
    finally:
        for layer in layers.values():
            layer._mixed = None


def lora_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The ``A`` and ``B`` parameters of adapter ``name`` (what training updates).

    Returns:
        ``[A, B, A, B, ...]``, one pair per layer holding the adapter, in module order.
    """
    out: list[nn.Parameter] = []
    for layer in _require(model, name).values():
        if name in layer.configs:
            out += [layer.lora_A[name], layer.lora_B[name]]
    return out
