"""``ModelConfig``: the shape of a ``SimpleTransformerModel``, validated, YAML round-trip."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or file is invalid."""


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")


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
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not (0.0 <= self.dropout < 1.0)
        ):
            raise ConfigError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if not isinstance(self.tie_weights, bool):
            raise ConfigError(f"tie_weights must be a bool, got {self.tie_weights!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
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
            raise ConfigError(f"unknown model config keys {unknown}; known: {sorted(known)}")
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
    """Read a YAML file that must hold a mapping; raise ConfigError naming the file if not."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}"
        )
    return data
