"""ryzen_opt: measured, verified optimization of PyTorch transformers.

Public names::

    from ryzen_opt import optimize, KernelOptimizer, SemanticCompressor, \
        InferenceScalingEngine, SimpleTransformerModel
    from ryzen_opt import LoraConfig, add_lora, save_adapter, load_adapter, AdapterRegistry
    from ryzen_opt import optimize_training

The names load on first use (PEP 562): ``import ryzen_opt`` imports nothing heavy, so the
edge install (``ryzen-opt-edge``: numpy and onnxruntime, no torch) can import
``ryzen_opt.compress.OnnxGenerator`` through this same package. In the full install every
name resolves exactly as an eager import would.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "AdapterRegistry": "ryzen_opt.adapters",
    "InferenceScalingEngine": "ryzen_opt.scaling",
    "KernelOptimizer": "ryzen_opt.optimizer",
    "LoraConfig": "ryzen_opt.adapters",
    "ModelConfig": "ryzen_opt.models",
    "OptimizeConfig": "ryzen_opt.optimizer",
    "SemanticCompressor": "ryzen_opt.compress",
    "SimpleTransformerModel": "ryzen_opt.models",
    "add_lora": "ryzen_opt.adapters",
    "load_adapter": "ryzen_opt.adapters",
    "optimize": "ryzen_opt.optimizer",
    "optimize_training": "ryzen_opt.training",
    "save_adapter": "ryzen_opt.adapters",
}

__all__ = [
    "AdapterRegistry",
    "InferenceScalingEngine",
    "KernelOptimizer",
    "LoraConfig",
    "ModelConfig",
    "OptimizeConfig",
    "SemanticCompressor",
    "SimpleTransformerModel",
    "add_lora",
    "load_adapter",
    "optimize",
    "optimize_training",
    "save_adapter",
]

if TYPE_CHECKING:  # type checkers and IDEs see the eager imports
    from ryzen_opt.adapters import (
        AdapterRegistry,
        LoraConfig,
        add_lora,
        load_adapter,
        save_adapter,
    )
    from ryzen_opt.compress import SemanticCompressor
    from ryzen_opt.models import ModelConfig, SimpleTransformerModel
    from ryzen_opt.optimizer import KernelOptimizer, OptimizeConfig, optimize
    from ryzen_opt.scaling import InferenceScalingEngine
    from ryzen_opt.training import optimize_training


def _lazy_attr(package: str, table: dict[str, str], name: str) -> object:
    """``name`` of ``package``: ``table[name]`` from its module, else the submodule ``name``.

    The value is cached in the package's namespace, so later lookups skip this function. In the
    edge install, where the torch-side modules are not shipped, the ``ModuleNotFoundError``
    says which install provides the name.
    """
    module = table.get(name)
    target = module if module is not None else f"{package}.{name}"
    if module is None and (name.startswith("_") or importlib.util.find_spec(target) is None):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    try:
        mod = importlib.import_module(target)
    except ModuleNotFoundError as e:
        if importlib.util.find_spec("ryzen_opt.optimizer") is not None:
            raise  # the full install: a genuinely missing dependency, reported as is
        raise ModuleNotFoundError(
            f"{package}.{name} is not part of the edge install (ryzen-opt-edge ships only "
            f"ryzen_opt.compress.OnnxGenerator, with numpy and onnxruntime); install the full "
            f"package for it: pip install ryzen-opt",
            name=e.name,
        ) from e
    value = getattr(mod, name) if module is not None else mod
    importlib.import_module(package).__dict__[name] = value
    return value


class _LazyPackage(types.ModuleType):
    """A package whose public names load on first use; keeps names that share a submodule's.

    Importing a submodule binds it on its parent package, so once anything imports
    ``ryzen_opt.compress.quantize`` (the module), ``ryzen_opt.compress.quantize`` would stop
    being the public function of that name. A binding of a submodule whose name is a public
    name defined inside that submodule stores the name's value instead, as the eager
    ``from .quantize import quantize`` used to.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if (
            isinstance(value, types.ModuleType)
            and value.__name__ == f"{self.__name__}.{name}"
            and self.__dict__.get("_LAZY", {}).get(name) == value.__name__
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


def __getattr__(name: str) -> object:
    return _lazy_attr(__name__, _LAZY, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


sys.modules[__name__].__class__ = _LazyPackage
