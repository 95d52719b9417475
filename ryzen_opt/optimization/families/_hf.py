"""What the Hugging Face decoder families share: config reading and the common refusals."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ryzen_opt.optimization.hf import is_hf_model

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def model_type(model: nn.Module) -> str | None:
    return (
        getattr(getattr(model, "config", None), "model_type", None) if is_hf_model(model) else None
    )


def rope_type(cfg: Any) -> str:
    """The rope type of a config on transformers 4.x (``rope_scaling``) and 5.x
    (``rope_parameters``)."""
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(cfg, attr, None)
        if isinstance(params, dict):
            return str(params.get("rope_type", params.get("type", "default")))
    return "default"


def common_refusal(model: nn.Module) -> str | None:
    """Reasons shared by every HF decoder family: quantized weights, dtype, device, autograd."""
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None or getattr(
        model, "is_quantized", False
    ):
        return "quantized checkpoint: the fast path reads plain float weights"
    params = list(model.parameters())
    if not params:
        return "the model has no parameters"
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        return (
            f"parameters must share one of float32/float16/bfloat16, got {sorted(map(str, dtypes))}"
        )
    if len(devices) != 1:
        return f"parameters are spread over {sorted(map(str, devices))}"
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        return "the model is dispatched over several devices"
    return None
