"""LoRA adapters on disk in PEFT's format, both ways.

A folder holds ``adapter_config.json`` (PEFT's ``LoraConfig`` fields: ``peft_type: "LORA"``,
``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``, ``fan_in_fan_out``...) and
``adapter_model.safetensors`` with one ``base_model.model.<module path>.lora_A.weight``
``(r, in)`` and ``...lora_B.weight`` ``(out, r)`` per targeted module: what
``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` reads (checked
against the ``peft`` package in the tests).

Loading reads and checks everything (config, every tensor's name and shape against the
model) before it touches the model, so a failed load leaves the model, its adapters and the
active one as they were. Every problem raises :class:`AdapterError` naming the file and the
mismatch. PEFT options this layer does not implement (DoRA, rsLoRA, LoRA biases, per-module
rank/alpha patterns, ``modules_to_save``, regex ``target_modules``) are refused, not ignored.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ryzen_opt.adapters.config import AdapterError, LoraConfig
from ryzen_opt.adapters.lora import (
    LoraLinear,
    _check_name,
    adapter_names,
    add_lora,
    find_targets,
    lora_layers,
)
from ryzen_opt.models.checkpoint import _write_atomically, remove_stale_partials
from ryzen_opt.models.config import short_repr

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the user's model
# An adapter config is ~1.5 KB (PEFT 0.21 writes 40 keys); 1 MiB refuses only mistakes.
MAX_CONFIG_BYTES = 1 << 20
# Options PEFT writes whose non-default values change the math; each is refused here.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "use_rslora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None,),
    "layers_to_transform": (None,),
    "layer_replication": (None,),
    "target_parameters": (None,),
    "trainable_token_indices": (None,),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
}


def _config(model: nn.Module, name: str) -> tuple[LoraConfig, dict[str, LoraLinear]]:
    _check_name(name)
    layers = {p: m for p, m in lora_layers(model).items() if name in m.configs}
    if not layers:
        raise AdapterError(f"adapter {name!r} is not in the model (it has {adapter_names(model)})")
    return next(iter(layers.values())).configs[name], layers


def save_adapter(model: nn.Module, folder: str | Path, name: str = "default") -> Path:
    """Write adapter ``name`` of ``model`` into ``folder`` in PEFT's format.

    Each file is written under a temporary name and renamed into place. A merged adapter is
    saved the same way (its ``A``/``B`` never change when merging).

    Args:
        model: a model with the adapter (:func:`add_lora` or :func:`load_adapter`).
        folder: the output folder (created).
        name: the adapter to save.

    Returns:
        The folder.

    Example:
        >>> import tempfile
        >>> from ryzen_opt.adapters import LoraConfig, add_lora, load_adapter, save_adapter
        >>> from ryzen_opt.models import ModelConfig, SimpleTransformerModel
        >>> m = add_lora(SimpleTransformerModel(ModelConfig(num_layers=1)), LoraConfig(rank=4))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save_adapter(m, d)
        ...     _ = load_adapter(m, d, name="copy")
    """
    cfg, layers = _config(model, name)
    state = {}
    for path, layer in layers.items():
        state[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].detach().cpu().contiguous()
        state[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].detach().cpu().contiguous()
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())
    return write_peft(folder, cfg, state, fan_in_fan_out)


def write_peft(
    folder: str | Path, cfg: LoraConfig, state: dict[str, torch.Tensor], fan_in_fan_out: bool
) -> Path:
    """Write PEFT's two files: ``state`` (PEFT key names) and ``cfg`` as its config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(folder)
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    text = json.dumps(peft_config, indent=2, sort_keys=True)
    _write_atomically(
        folder / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"})
    )
    _write_atomically(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return folder


def read_config(folder: str | Path) -> LoraConfig:
    """The :class:`LoraConfig` of the PEFT adapter in ``folder``; raises naming the file."""
    cfile = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise AdapterError(f"adapter folder {str(folder)!r} does not exist")
    if not cfile.is_file():
        raise AdapterError(f"adapter config {str(cfile)!r} is missing")
    if cfile.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"adapter config {str(cfile)!r} is over {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(cfile.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter config {str(cfile)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"adapter config {str(cfile)!r} must be a JSON object")
    if data.get("peft_type") != "LORA":
        raise AdapterError(
            f"adapter config {str(cfile)!r}: peft_type must be 'LORA', got "
            f"{short_repr(data.get('peft_type'))}"
        )
    for key, ok in _UNSUPPORTED.items():
        if key in data and data[key] not in ok:
            raise AdapterError(
                f"adapter config {str(cfile)!r}: {key}={short_repr(data[key])} is not "
                f"supported (only {ok[0]!r})"
            )
    for key in ("rank_pattern", "alpha_pattern"):
        if data.get(key):
            raise AdapterError(f"adapter config {str(cfile)!r}: {key} is not supported")
    targets = data.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(
            f"adapter config {str(cfile)!r}: target_modules={short_repr(targets)} is a regex "
            "or 'all-linear'; only a list of module names is supported"
        )
    r, dropout = data.get("r"), data.get("lora_dropout", 0.0)
    alpha = data.get("lora_alpha", 8)  # PEFT's default
    if not isinstance(r, numbers.Integral):
        raise AdapterError(f"adapter config {str(cfile)!r}: r must be an int, got {r!r}")
    try:
        return LoraConfig(rank=r, alpha=alpha, target_modules=targets or (), dropout=dropout)
    except AdapterError as e:
        raise AdapterError(f"adapter config {str(cfile)!r}: {e}") from None


def _read_weights(wfile: Path) -> dict[str, torch.Tensor]:
    if not wfile.is_file():
        raise AdapterError(f"adapter weights {str(wfile)!r} are missing")
    try:
        return load_file(str(wfile))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"adapter weights {str(wfile)!r} are corrupt: {e}") from None


def _check_tensors(
    state: dict[str, torch.Tensor], cfg: LoraConfig, targets: dict, wfile: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{path: (A, B)}`` after checking names, ranks and shapes against the model."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    expected = set()
    for path, m in targets.items():
        keys = (f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight")
        expected.update(keys)
        missing = [k for k in keys if k not in state]
        if missing:
            raise AdapterError(
                f"adapter weights {str(wfile)!r} lack {missing[0]}: the config's "
                f"target_modules {list(cfg.target_modules)} match module {path!r} of the model"
            )
        a, b = state[keys[0]], state[keys[1]]
        d_in, d_out = _features(m)
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"adapter weights {str(wfile)!r}: {path} holds {a.dtype}/{b.dtype}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != cfg.rank or b.shape[1] != cfg.rank:
            raise AdapterError(
                f"adapter weights {str(wfile)!r}: rank mismatch at {path}: the config says "
                f"r={cfg.rank}, lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}"
            )
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise AdapterError(
                f"adapter weights {str(wfile)!r}: base-model shape mismatch at {path}: the "
                f"model's layer maps {d_in} -> {d_out} features, the adapter "
                f"{a.shape[1]} -> {b.shape[0]}"
            )
        out[path] = (a, b)
    extra = sorted(set(state) - expected)
    if extra:
        raise AdapterError(
            f"adapter weights {str(wfile)!r} hold {len(extra)} tensors for modules the config "
            f"does not target in this model, e.g. {extra[0]}"
        )
    return out


def _features(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, LoraLinear):
        return m.in_features, m.out_features
    w = m.weight
    return (w.shape[0], w.shape[1]) if type(m).__name__ == "Conv1D" else (w.shape[1], w.shape[0])


def load_adapter(model: nn.Module, folder: str | Path, name: str = "default") -> nn.Module:
    """Load the PEFT-format adapter in ``folder`` into ``model`` as adapter ``name``.

    The adapter is added, not activated (:func:`set_adapter` / :func:`merge_adapter`).
    Everything is checked before the model changes, so a failed load leaves it as it was.

    Args:
        model: the base model the adapter was trained on (plain or already holding adapters).
        folder: a folder written by :func:`save_adapter` or PEFT's ``save_pretrained``.
        name: the name to give the adapter in ``model`` (must be new).

    Returns:
        ``model``.

    Raises:
        AdapterError: the name is taken; a file is missing or corrupt; the config uses a PEFT
            option not implemented here; the rank, target modules or layer shapes do not
            match the model (the message names the file, the module and both shapes).

    Example:
        See :func:`save_adapter`.
    """
    _check_name(name)
    if name in adapter_names(model):
        raise AdapterError(f"name {name!r}: the model already has an adapter of that name")
    folder = Path(folder)
    cfg = read_config(folder)
    try:
        targets = find_targets(model, cfg)
    except AdapterError as e:
        raise AdapterError(f"adapter {str(folder)!r} does not fit the model: {e}") from None
    wfile = folder / WEIGHTS_NAME
    weights = _check_tensors(_read_weights(wfile), cfg, targets, wfile)
    add_lora(model, cfg, name, init=False)
    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            if path in weights:
                a, b = weights[path]
                layer.lora_A[name].copy_(a)
                layer.lora_B[name].copy_(b)
    return model
