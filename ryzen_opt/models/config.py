"""``ModelConfig``: the shape of a ``SimpleTransformerModel``, validated, YAML round-trip."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# A config file is a few hundred bytes (checkpoints/default/config.yaml: 140); 1 MiB leaves
# room for comments while refusing files that only a mistake or an attack would produce.
MAX_CONFIG_BYTES = 1 << 20
# What an error message quotes of a value: a 618-byte YAML of nested aliases expanded to a
# value whose repr was 72 MB, and every message that quoted it was as long.
MAX_QUOTE_CHARS = 200


class ConfigError(ValueError):
    """A configuration value or file is invalid."""


def short_repr(value: Any, limit: int = MAX_QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages.

    Containers are walked only as far as needed, so a value that expands to gigabytes (a
    YAML alias bomb) is never turned into a full string.
    """
    try:
        text = _bounded_repr(value, limit + 1)
    except Exception:  # a broken __repr__ must not hide the error being reported
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bounded_repr(value: Any, budget: int) -> str:
    # Lists, tuples and dicts are expanded element by element until ``budget`` is spent.
    if isinstance(value, (list, tuple, dict)):
        opening, closing = {list: "[]", tuple: "()", dict: "{}"}.get(type(value), "[]")
        parts, used = [], 1
        items = value.items() if isinstance(value, dict) else value
        for item in items:
            if used >= budget:
                parts.append("...")
                break
            if isinstance(value, dict):
                k, v = item
                part = _bounded_repr(k, budget - used) + ": " + _bounded_repr(v, budget - used)
            else:
                part = _bounded_repr(item, budget - used)
            parts.append(part)
            used += len(part) + 2
        return opening + ", ".join(parts) + closing
    return repr(value)[:budget]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {short_repr(value)}")


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {short_repr(value)}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {short_repr(value)}")
    return float(value)


@dataclass
class ModelConfig:
    """Shape of the baseline decoder.

    Defaults are the reference configuration this project benchmarks against (a 2-layer,
    256-wide GPT-style decoder over a 2048-token vocabulary and 128-token context).
    """

    vocab_size: int = 2048
    embedding_dim: int = 256
    num_heads: int = 4
    num_layers: int = 2
    ff_dim: int = 512
    max_seq_len: int = 128
    dropout: float = 0.0
    # Tied: the output head reuses the token embedding (GPT-2 style); saves vocab*dim params.
    tie_weights: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embedding_dim", "num_heads", "num_layers", "ff_dim"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("max_seq_len", self.max_seq_len)
        if self.embedding_dim % self.num_heads != 0:
            raise ConfigError(
                f"embedding_dim ({self.embedding_dim}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        if not 0.0 <= _check_real("dropout", self.dropout) < 1.0:
            raise ConfigError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if not isinstance(self.tie_weights, bool):
            raise ConfigError(f"tie_weights must be a bool, got {short_repr(self.tie_weights)}")
        # nan here made every logit NaN (LayerNorm divides by sqrt(var + eps)).
        if _check_real("layer_norm_eps", self.layer_norm_eps) <= 0:
            raise ConfigError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a mapping; unknown keys raise naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config keys {short_repr(unknown)}; known: {sorted(known)}"
            )
        return cls(**data)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """Load from a YAML file (a mapping, or a mapping with a ``model:`` section)."""
        data = load_yaml_mapping(path)
        if "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        return cls.from_dict(data)


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; raise ConfigError naming the file if not.

    Anchors and aliases are refused (a few hundred bytes of nested aliases expand to
    gigabytes: the "billion laughs"), and so is a file over ``MAX_CONFIG_BYTES``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {str(path)!r} is {size} bytes; a config is at most "
            f"{MAX_CONFIG_BYTES} bytes"
        )
    try:
        text = path.read_text()
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(
                    f"config file {str(path)!r} uses a YAML alias (*{short_repr(event.anchor)});"
                    " aliases are not allowed in config files, write the values out"
                )
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {short_repr(str(e), 400)}"
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}"
        )
    return data
