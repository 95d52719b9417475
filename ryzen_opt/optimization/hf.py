"""Hugging Face decoders: attention served through transformers' ``AttentionInterface``.

``optimize()`` does not copy or rewrite transformers modules. It registers one attention
function per original implementation (``ryzen_opt_sdpa``, ``ryzen_opt_eager``) with the
same mask function as that implementation, and switches the *copy* of the model to it with
``set_attn_implementation``. The function looks up the routes stored on the calling
attention module; a call outside them goes to the original implementation with the
original arguments, so an unmeasured shape computes exactly what the model did before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ryzen_opt.optimization.modules import Route, _needs_autograd, _Router, attention_call

PREFIX = "ryzen_opt_"
ROUTES_ATTR = "_ryzen_opt_attention_routes"
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")

# While not None, every call through the registered functions is appended here (capture).
_CAPTURE: list[dict[str, Any]] | None = None
_CAPTURE_LABEL = ""


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing it)."""
    mod = sys.modules.get("transformers")
    return mod is not None and isinstance(model, mod.PreTrainedModel)


def original_function(module: nn.Module, impl: str) -> Callable[..., Any]:
    """The attention function ``impl`` that ``module``'s model used before optimization."""
    if impl == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__} has no eager_attention_forward")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def _impl_of(module: nn.Module) -> str:
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None) or "sdpa"
    return impl[len(PREFIX) :] if impl.startswith(PREFIX) else impl


def hf_case(lq: int, lk: int) -> str | None:
    if lq == 1:
        return "decode"
    return "prefill" if lq == lk else None


def hf_mask_causal_scale(module, query, key, attention_mask, kwargs):
    """The mask, causal flag and scale a backend gets, read as the original function reads them."""
    lq, lk = query.shape[2], key.shape[2]
    if attention_mask is not None:
        return attention_mask[:, :, :, :lk], False, kwargs.get("scaling")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = lq > 1 and getattr(module, "is_causal", True)
    return None, bool(is_causal), kwargs.get("scaling")


def hf_kernel_call(op, launcher, module, query, key, value, attention_mask, kwargs):
    """The attention output ``(B, Lq, H, D)`` from a backend, as the interface returns it."""
    mask, causal, scale = hf_mask_causal_scale(module, query, key, attention_mask, kwargs)
    out = attention_call(op, launcher, query, key, value, causal, scale, mask)
    return out.transpose(1, 2).contiguous()


def hf_dims(query, key, attention_mask) -> dict[str, int]:
    return {
        "batch": query.shape[0],
        "kv_len": key.shape[2],
        "mask": 0 if attention_mask is None else 1,
    }


def attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: a measured backend where routed, else the original."""
    impl = _impl_of(module)
    if _CAPTURE is not None:
        _CAPTURE.append(
            {
                "label": _CAPTURE_LABEL,
                "module": module,
                "impl": impl,
                "args": (query, key, value, attention_mask),
                "kwargs": dict(kwargs),
            }
        )
    router: _Router | None = getattr(module, ROUTES_ATTR, None)
    if (
        router is not None
        and router.routes
        and not kwargs.get("dropout")
        and not kwargs.get("output_attentions")
        and kwargs.get("head_mask") is None
        and not _needs_autograd(query, key, value)
    ):
        case = hf_case(query.shape[2], key.shape[2])
        if case is not None:
            hit = router.find(
                case, query.device.type, query.dtype, hf_dims(query, key, attention_mask)
            )
            if hit is not None:
                route, launcher = hit
                out = hf_kernel_call(
                    route.op, launcher, module, query, key, value, attention_mask, kwargs
                )
                return out, None
    return original_function(module, impl)(module, query, key, value, attention_mask, **kwargs)


def register(impl: str) -> str:
    """Register the routing function for models that used ``impl``; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = PREFIX + impl
    AttentionInterface.register(name, attention_forward)
    # The same masks as the original implementation, so the fallback sees identical inputs.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


def switch(model: nn.Module) -> str | None:
    """Point ``model`` at the routing function; ``None`` on success, else the reason."""
    impl = model.config._attn_implementation
    if impl not in SUPPORTED_IMPLEMENTATIONS:
        return f"attention implementation {impl!r} is not one of {SUPPORTED_IMPLEMENTATIONS}"
    name = register(impl)
    try:
        model.set_attn_implementation(name)
    except Exception as e:  # a model class that cannot switch keeps its own attention
        return f"set_attn_implementation({name!r}) failed: {type(e).__name__}: {e}"
    if model.config._attn_implementation != name:
        return f"{type(model).__name__} does not take attention functions from AttentionInterface"
    return None


def restore(model: nn.Module, impl: str) -> None:
    """Undo :func:`switch` and drop routes from every attention module."""
    for m in model.modules():
        if hasattr(m, ROUTES_ATTR):
            delattr(m, ROUTES_ATTR)
    if model.config._attn_implementation != impl:
        model.set_attn_implementation(impl)


def install(module: nn.Module, routes: list[Route]) -> None:
    """Attach routes to one attention module (a plain attribute, not a parameter)."""
    setattr(module, ROUTES_ATTR, _Router.build(routes))


class capture:
    """Context manager recording every call made through the routing function."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def __enter__(self) -> capture:
        global _CAPTURE
        _CAPTURE = self.records
        return self

    def __exit__(self, *exc) -> None:
        global _CAPTURE
        _CAPTURE = None


def set_label(label: str) -> None:
    """The run label attached to the calls captured from now on."""
    global _CAPTURE_LABEL
    _CAPTURE_LABEL = label
