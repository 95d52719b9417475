"""LoRA adapters: PEFT-format I/O, merged/unmerged/mixed-batch serving, a registry, training,
and instant adapters (no training per task).

Public names::

    from ryzen_opt.adapters import LoraConfig, add_lora, save_adapter, load_adapter, \
        AdapterRegistry, train_adapter
    from ryzen_opt.adapters import TextToLoRA, GeneratedAdapter, SVFExperts

Instant adapters, for a server or a script::

    t2l = TextToLoRA.load("checkpoints/instant/t2l_sft")
    adapter = t2l.generate("add two 3-digit numbers, digits reversed", seed=0)  # ~1 ms
    registry.register("mine", adapter.save("runs/mine"))   # PEFT format, served like any other

    svf = SVFExperts.load("checkpoints/instant/svf", base_model)
    task = svf.identify(base_model, prompt_ids)[0]          # first pass: which skill
    svf.apply(model, task)                                  # or {"add2": 0.6, "sub2": 0.4}
    model.generate(prompt_ids, 8)                           # second pass, any fast path
"""

from ryzen_opt.adapters.config import AdapterError, LoraConfig
from ryzen_opt.adapters.io import load_adapter, read_config, save_adapter
from ryzen_opt.adapters.lora import (
    LoraLinear,
    adapter_names,
    add_lora,
    delete_adapter,
    lora_bgmv,
    lora_layers,
    lora_parameters,
    merge_adapter,
    mixed_batch,
    remove_lora,
    set_adapter,
    unmerge_adapter,
)
from ryzen_opt.adapters.registry import AdapterRegistry
from ryzen_opt.adapters.svf import SVFExperts
from ryzen_opt.adapters.t2l import GeneratedAdapter, TextToLoRA

__all__ = [
    "AdapterError",
    "AdapterRegistry",
    "AdapterTrainConfig",
    "GeneratedAdapter",
    "LoraConfig",
    "LoraLinear",
    "SVFExperts",
    "TextToLoRA",
    "adapter_names",
    "add_lora",
    "delete_adapter",
    "load_adapter",
    "lora_bgmv",
    "lora_layers",
    "lora_parameters",
    "merge_adapter",
    "mixed_batch",
    "read_config",
    "remove_lora",
    "save_adapter",
    "set_adapter",
    "train_adapter",
    "unmerge_adapter",
]


def __getattr__(name: str) -> object:
    # The trainer loads on first use: an eager import would make
    # ``python -m ryzen_opt.adapters.train`` import its own module twice (runpy warns).
    if name in ("AdapterTrainConfig", "train_adapter"):
        from ryzen_opt.adapters import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
