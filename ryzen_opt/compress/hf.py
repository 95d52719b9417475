"""The Optimum path for Hugging Face decoders: ONNX export and AVX-512 VNNI int8 quantization.

``optimum-onnx`` (the ``hf`` extra) exports a local ``transformers`` causal LM folder with its
KV cache through ``ORTModelForCausalLM`` and quantizes it with ``ORTQuantizer`` and
``AutoQuantizationConfig.avx512_vnni`` (dynamic int8, s8 weights). Everything works offline
on a folder written by ``save_pretrained``: nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _require_optimum():
    try:
        from optimum.onnxruntime import ORTModelForCausalLM, ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig
    except ImportError as e:  # pragma: no cover - the hf extra is part of the dev install
        raise ImportError("the Optimum path needs the hf extra: pip install 'ryzen-opt[hf]'") from e
    return ORTModelForCausalLM, ORTQuantizer, AutoQuantizationConfig


def _check_dir(path: Any, name: str, must_exist: bool = True) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or PathLike, got {type(path).__name__}")
    p = Path(path)
    if must_exist and not p.is_dir():
        raise FileNotFoundError(f"{name} {str(p)!r} is not a folder")
    return p


def export_hf_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export a local Hugging Face causal LM to ONNX (with KV cache) through Optimum.

    Args:
        model_dir: a folder written by ``save_pretrained`` (``config.json`` + weights).
        out_dir: where the ONNX model and its config are saved.

    Returns:
        ``out_dir``, loadable with ``ORTModelForCausalLM.from_pretrained``.
    """
    ORTModelForCausalLM, _, _ = _require_optimum()
    src = _check_dir(model_dir, "model_dir")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"model_dir {str(src)!r} has no config.json")
    out = _check_dir(out_dir, "out_dir", must_exist=False)
    model = ORTModelForCausalLM.from_pretrained(
        str(src), export=True, use_cache=True, local_files_only=True
    )
    model.save_pretrained(str(out))
    return out


def quantize_hf_onnx(
    onnx_dir: str | os.PathLike, out_dir: str | os.PathLike, per_channel: bool = False
) -> Path:
    """Dynamic int8 quantization of an Optimum ONNX export for AVX-512 VNNI CPUs.

    Args:
        onnx_dir: a folder written by :func:`export_hf_onnx`.
        out_dir: where the quantized model (``model_quantized.onnx``) and config go.
        per_channel: one weight scale per output channel.

    Returns:
        ``out_dir``, loadable with ``ORTModelForCausalLM.from_pretrained(out_dir,
        file_name="model_quantized.onnx")``.
    """
    _, ORTQuantizer, AutoQuantizationConfig = _require_optimum()
    src = _check_dir(onnx_dir, "onnx_dir")
    if not any(src.glob("*.onnx")):
        raise FileNotFoundError(f"onnx_dir {str(src)!r} holds no .onnx file")
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be a bool, got {per_channel!r}")
    out = _check_dir(out_dir, "out_dir", must_exist=False)
    quantizer = ORTQuantizer.from_pretrained(str(src), file_name="model.onnx")
    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=per_channel)
    quantizer.quantize(quantization_config=qconfig, save_dir=str(out))
    # The quantized folder must stand alone: carry the model config next to the weights.
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file() and not (out / name).is_file():
            (out / name).write_bytes((src / name).read_bytes())
    return out
