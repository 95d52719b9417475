"""Checkpoints: a folder with ``model.safetensors`` (weights) and ``config.yaml``.

Nothing is unpickled: weights load through safetensors, the config through ``yaml.safe_load``
(aliases refused). Loading validates the config, then every tensor's name, shape and dtype
from the safetensors header (no data read) against the model the config describes, and only
then reads the weights and builds the model; a config with a vocabulary of 10**9 fails in
milliseconds instead of allocating for 20 s first. Any problem raises
:class:`CheckpointError` naming the file and what was expected.

Saving writes each file under a temporary name in the same folder and renames it into
place, so a writer killed midway leaves the previous checkpoint intact. Temporaries are
named ``.<file>.<pid>.<random>.partial``: the loader never reads them, a failed save removes
its own, and the next save removes those of writers that are no longer running.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ryzen_opt.models.config import ConfigError, ModelConfig, short_repr
from ryzen_opt.models.model import SimpleTransformerModel, state_shapes

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
PARTIAL_SUFFIX = ".partial"
# safetensors header dtypes a floating-point parameter may be stored in.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or unreadable: leave its file alone
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete the temporaries of writers that died before renaming them; return them."""
    removed = []
    for p in folder.glob(f".*{PARTIAL_SUFFIX}"):
        parts = p.name[: -len(PARTIAL_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or _pid_alive(int(parts[1])):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def _write_atomically(final: Path, write) -> None:
    """``write(tmp_path)`` into a recognisable temporary next to ``final``, then rename."""
    tmp = final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
    # 0o666 through O_CREAT honours the umask, so the renamed file gets the usual mode
    # (mkstemp's 0o600 would make every checkpoint private).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(str(tmp))
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_checkpoint(model: SimpleTransformerModel, path: str | Path) -> Path:
    """Write ``model``'s weights and config into folder ``path`` (created if needed).

    Each file is written under a temporary name and renamed into place, so an interrupted
    save never leaves a half-written ``model.safetensors`` or ``config.yaml``.

    Returns:
        The folder.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError("model must carry a ModelConfig as .config (a SimpleTransformerModel)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    state = _unique_state(model)
    _write_atomically(
        path / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"})
    )
    _write_atomically(path / CONFIG_NAME, config.to_yaml)
    return path


def _check_header(wfile: Path, config: ModelConfig) -> None:
    """Names, shapes and dtypes from the safetensors header against ``config``."""
    try:
        with safe_open(str(wfile), framework="pt") as f:
            names = f.keys()
            header = {n: (f.get_slice(n).get_shape(), f.get_slice(n).get_dtype()) for n in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint weights {str(wfile)!r} are corrupt: {short_repr(str(e))}"
        ) from None
    expected = state_shapes(config)
    names = set(header)
    if config.tie_weights and "head.weight" not in names:
        names.add("head.weight")  # stored once, under tok_emb.weight
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(wfile)!r} does not match its config: missing "
            f"{short_repr(missing[:5])}, unexpected {short_repr(unexpected[:5])}"
        )
    for name in (n for n in expected if n in header):  # the model's order: fc1.weight first
        shape, dtype = header[name]
        if tuple(shape) != expected[name]:
            raise CheckpointError(
                f"checkpoint {str(wfile)!r}: {name} has shape {short_repr(tuple(shape))}, "
                f"config expects {expected[name]}"
            )
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"checkpoint {str(wfile)!r}: {name} is {dtype}, expected one of {_FLOAT_DTYPES}"
            )


def load_state(path: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Read and check the weights file of checkpoint folder ``path`` against ``config``."""
    wfile = Path(path) / WEIGHTS_NAME
    if not wfile.is_file():
        raise CheckpointError(f"checkpoint weights {str(wfile)!r} do not exist")
    _check_header(wfile, config)
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint weights {str(wfile)!r} are corrupt: {short_repr(str(e))}"
        ) from None
    if config.tie_weights:
        if "head.weight" not in state:
            state["head.weight"] = state["tok_emb.weight"]
        elif not torch.equal(state["head.weight"], state["tok_emb.weight"]):
            # Loading would keep one of the two and silently drop the other.
            raise CheckpointError(
                f"checkpoint {str(wfile)!r}: head.weight differs from tok_emb.weight but the "
                "config ties them (tie_weights: true); set tie_weights: false to keep both"
            )
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
