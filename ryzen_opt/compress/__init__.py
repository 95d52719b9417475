"""ONNX export, ONNX Runtime quantization and pruning, judged by size, speed and accuracy.

Public names::

    export_onnx, OnnxGenerator              the fp32 decoder and its numpy/ORT generator
    quantize, QuantizeConfig                dynamic/static int8, int4/int8 weight-only
    structured_prune, magnitude_prune, ...  pruning (PruneConfig)
    SemanticCompressor, CompressConfig      one verdict per artifact, side by side with fp32

The names load on first use (PEP 562), so ``from ryzen_opt.compress import OnnxGenerator``
imports only numpy and onnxruntime: the edge install (``ryzen-opt-edge``) ships this file,
``ryzen_opt/__init__.py`` and ``runtime.py``, and nothing that needs torch.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ryzen_opt import _lazy_attr, _LazyPackage

# public name -> the module that defines it
_LAZY = {
    "METHODS": "ryzen_opt.compress.compressor",
    "ArtifactResult": "ryzen_opt.compress.compressor",
    "CompressConfig": "ryzen_opt.compress.compressor",
    "CompressionReport": "ryzen_opt.compress.compressor",
    "OnnxGenerator": "ryzen_opt.compress.runtime",
    "PruneConfig": "ryzen_opt.compress.prune",
    "QuantizeConfig": "ryzen_opt.compress.quantize",
    "SemanticCompressor": "ryzen_opt.compress.compressor",
    "export_onnx": "ryzen_opt.compress.export",
    "finetune": "ryzen_opt.compress.prune",
    "magnitude_prune": "ryzen_opt.compress.prune",
    "prune_vocabulary": "ryzen_opt.compress.prune",
    "quantize": "ryzen_opt.compress.quantize",
    "semi_structured_24": "ryzen_opt.compress.prune",
    "structured_prune": "ryzen_opt.compress.prune",
}

__all__ = [
    "ArtifactResult",
    "CompressConfig",
    "CompressionReport",
    "METHODS",
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

if TYPE_CHECKING:  # type checkers and IDEs see the eager imports
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


def __getattr__(name: str) -> object:
    return _lazy_attr(__name__, _LAZY, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


sys.modules[__name__].__class__ = _LazyPackage
