"""ONNX export, ONNX Runtime quantization and pruning, judged by size, speed and accuracy.

Public names::

    export_onnx, OnnxGenerator              the fp32 decoder and its numpy/ORT generator
    quantize, QuantizeConfig                dynamic/static int8, int4/int8 weight-only
    structured_prune, magnitude_prune, ...  pruning (PruneConfig)
    SemanticCompressor, CompressConfig      one verdict per artifact, side by side with fp32
"""

from ryzen_opt.compress.compressor import (
    METHODS,
    ArtifactResult,
    CompressConfig,
    CompressionReport,
    SemanticCompressor,
)
from ryzen_opt.compress.export import export_onnx
from ryzen_opt.compress.prune import (
    PruneConfig,
    finetune,
    magnitude_prune,
    prune_vocabulary,
    semi_structured_24,
    structured_prune,
)
from ryzen_opt.compress.quantize import QuantizeConfig, quantize
from ryzen_opt.compress.runtime import OnnxGenerator

__all__ = [
    "METHODS",
    "ArtifactResult",
    "CompressConfig",
    "CompressionReport",
    "OnnxGenerator",
    "PruneConfig",
    "QuantizeConfig",
    "SemanticCompressor",
    "export_onnx",
    "finetune",
    "magnitude_prune",
    "prune_vocabulary",
    "quantize",
    "semi_structured_24",
    "structured_prune",
]
