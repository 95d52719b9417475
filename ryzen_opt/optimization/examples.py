"""``example_inputs``: the three accepted forms, normalised once for every model kind.

``optimize(model, example_inputs=...)`` takes what ``torch.export`` and ``torch.compile``
take: a tensor (the first forward argument), a tuple of positional forward arguments, or a
dict of keyword arguments. Each form is bound to the model's own ``forward`` signature, so
``(ids,)``, ``ids`` and ``{"input_ids": ids}`` mean the same prompt. What the rest of the
optimizer receives is one canonical form per model kind:

- ``SimpleTransformerModel``: the ``(batch, seq)`` token-id tensor;
- a transformers decoder: a dict of keyword arguments holding ``input_ids``;
- any other module: a tuple of positional arguments or a dict of keyword arguments.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from ryzen_opt.models.config import short_repr
from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.optimization import hf

_FORMS = "a tensor, a tuple of positional forward arguments or a dict of keyword arguments"
# Keyword arguments that would hand the optimizer a cache it did not build: decode steps are
# measured after caches made from the prompt itself.
_CACHE_ARGS = ("kv_cache", "past_key_values")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _bind(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``forward``'s arguments by name (``**kwargs`` flattened), or TypeError naming them."""
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(
            f"example_inputs do not fit {type(model).__name__}.forward{sig}: {e}"
        ) from None
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(
                f"example_inputs give {len(value)} extra positional argument(s) to "
                f"{type(model).__name__}.forward; pass them by name in a dict"
            )
        else:
            out[name] = value
    return out


def _check_ids(ids: Any, name: str, vocab: int, max_len: int | None) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            f"example_inputs: {name} must be a (batch, seq) tensor of token ids, got "
            f"{type(ids).__name__}"
        )
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        raise ValueError(
            f"example_inputs: {name} must be a 2-D int64/int32 tensor of token ids, got "
            f"{ids.dtype} of shape {tuple(ids.shape)}"
        )
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"example_inputs: {name} must not be empty, got {tuple(ids.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(
            f"example_inputs: {name} ids must lie in [0, {vocab}), got min {lo} max {hi}"
        )
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(
            f"example_inputs: {name} length {ids.shape[1]} exceeds max_seq_len={max_len}"
        )


def _split(example: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of one accepted form; TypeError naming example_inputs otherwise."""
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, tuple):
        return example, {}
    if isinstance(example, dict):
        bad = [k for k in example if not isinstance(k, str)]
        if bad:
            raise TypeError(
                "example_inputs as a dict must map forward argument names (str) to values, "
                f"got key {short_repr(bad[0])}"
            )
        return (), dict(example)
    raise TypeError(f"example_inputs must be None, {_FORMS}; got {type(example).__name__}")


def normalize_example(model: nn.Module, example: Any, device: torch.device) -> Any:
    """The canonical form of ``example`` for ``model`` (see the module docstring).

    Raises:
        TypeError / ValueError naming ``example_inputs`` for any other form, arguments that
        do not fit ``model.forward``, a cache argument, or token ids the model cannot embed.
    """
    is_stm, is_hf = isinstance(model, SimpleTransformerModel), hf.is_hf_model(model)
    if example is None:
        if is_stm or is_hf:
            return None
        raise ValueError(
            f"example_inputs is required for a {type(model).__name__} (only "
            "SimpleTransformerModel and transformers decoders have synthetic inputs)"
        )
    args, kwargs = _split(example)
    args = tuple(_to(a, device) for a in args)
    kwargs = {k: _to(v, device) for k, v in kwargs.items()}
    if not (is_stm or is_hf):
        return kwargs if isinstance(example, dict) else args
    named = _bind(model, args, kwargs)
    given = [k for k in _CACHE_ARGS if named.get(k) is not None]
    if given:
        raise ValueError(
            f"example_inputs must describe a prompt, not carry {given[0]}: optimize() "
            "measures decode steps after caches it builds from the prompt"
        )
    if is_stm:
        cfg = model.config
        _check_ids(named.get("idx"), "idx", cfg.vocab_size, cfg.max_seq_len)
        return named["idx"]
    named.pop("past_key_values", None)
    ids = named.get("input_ids")
    _check_ids(ids, "input_ids", model.config.vocab_size, None)
    mask = named.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        raise ValueError(
            "example_inputs: attention_mask must be a tensor of the shape of input_ids "
            f"{tuple(ids.shape)}, got {short_repr(getattr(mask, 'shape', mask))}"
        )
    return named
