"""The baseline model, its config and checkpoints, a verifiable task and a trainer."""

from ryzen_opt.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ryzen_opt.models.config import ConfigError, ModelConfig
from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.models.tasks import ArithmeticTask, CharTokenizer

__all__ = [
    "ArithmeticTask",
    "CharTokenizer",
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "SimpleTransformerModel",
    "load_checkpoint",
    "save_checkpoint",
]
