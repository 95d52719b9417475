"""ryzen_opt: measured, verified optimization of PyTorch transformers.

Public names::

    from ryzen_opt import optimize, KernelOptimizer, SemanticCompressor, \
        InferenceScalingEngine, SimpleTransformerModel
"""

from ryzen_opt.compress import SemanticCompressor
from ryzen_opt.models import ModelConfig, SimpleTransformerModel
from ryzen_opt.optimizer import KernelOptimizer, OptimizeConfig, optimize
from ryzen_opt.scaling import InferenceScalingEngine

__version__ = "0.1.0"

__all__ = [
    "InferenceScalingEngine",
    "KernelOptimizer",
    "ModelConfig",
    "OptimizeConfig",
    "SemanticCompressor",
    "SimpleTransformerModel",
    "optimize",
]
