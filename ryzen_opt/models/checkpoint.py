"""Checkpoints: a folder with ``model.safetensors`` (weights) and ``config.yaml``.

Nothing is unpickled: weights load through safetensors, the config through ``yaml.safe_load``.
Loading checks every tensor name and shape against the model the config describes, and any
problem raises :class:`CheckpointError` naming the file and what was expected.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ryzen_opt.models.config import ConfigError, ModelConfig
from ryzen_opt.models.model import SimpleTransformerModel

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match its config."""


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage: store a tied head's weight once (under tok_emb).
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        state[name] = t.detach().cpu().contiguous()
    return state


def save_checkpoint(model: SimpleTransformerModel, path: str | Path) -> Path:
    """Write ``model``'s weights and config into folder ``path`` (created if needed).

    Returns:
        The folder.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError("model must carry a ModelConfig as .config (a SimpleTransformerModel)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(_unique_state(model), str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    config.to_yaml(path / CONFIG_NAME)
    return path


def load_state(path: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Read and check the weights file of checkpoint folder ``path`` against ``config``."""
    wfile = Path(path) / WEIGHTS_NAME
    if not wfile.is_file():
        raise CheckpointError(f"checkpoint weights {str(wfile)!r} do not exist")
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint weights {str(wfile)!r} are corrupt: {e}") from None
    expected = SimpleTransformerModel(config).state_dict()
    if config.tie_weights and "head.weight" not in state and "tok_emb.weight" in state:
        state["head.weight"] = state["tok_emb.weight"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(wfile)!r} does not match its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, t in expected.items():
        if state[name].shape != t.shape:
            raise CheckpointError(
                f"checkpoint {str(wfile)!r}: {name} has shape {tuple(state[name].shape)}, "
                f"config expects {tuple(t.shape)}"
            )
        if not state[name].is_floating_point():
            raise CheckpointError(f"checkpoint {str(wfile)!r}: {name} is not floating point")
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """Load a :class:`SimpleTransformerModel` saved by :func:`save_checkpoint`.

    Args:
        path: the checkpoint folder.
        map_location: device for the weights.

    Returns:
        The model, in eval mode.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist")
    try:
        config = ModelConfig.from_yaml(path / CONFIG_NAME)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint config is invalid: {e}") from None
    state = load_state(path, config)
    model = SimpleTransformerModel(config)
    model.load_state_dict(state)
    return model.to(map_location).eval()
