"""Backends per op: registration, explicit selection, and the ``auto`` fallback.

Adding a backend is one new module and one :func:`register` call at its bottom; this file
never grows an if/else per backend. A backend declares

* ``devices``: the torch device types it can run on (``"cpu"``, ``"cuda"``),
* ``available()``: ``None`` if its toolchain imports on this machine, else the reason,
* ``supports(*args, **kwargs)``: ``None`` if it can serve these inputs, else the reason. It
  must decide from shapes, dtypes and strides alone (the benchmark calls it on meta tensors)
  and must not read tensor values.

An explicit ``backend="numba"`` that cannot serve the input raises :class:`BackendError` with
the reason. ``backend="auto"`` uses a decision recorded by :func:`record_decision` (the
measured choice made by ``optimize()`` or the benchmark for that op/device/dtype/shape),
and otherwise the reference; the reason for each choice is kept in :func:`last_choice`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ryzen_opt.kernels import reference

OPS = ("matmul", "attention", "decode_attention", "layer_norm", "lora_bgmv")

# The backend module of each op is ``<backend>/<module>.py``: the op's name unless listed.
_MODULE_OF = {"lora_bgmv": "lora"}

# Modules that register backends when imported. A module that fails to import (toolchain
# missing) is recorded as unavailable, never fatal.
_BACKEND_MODULES = {
    backend: [f"ryzen_opt.kernels.{backend}.{_MODULE_OF.get(op, op)}" for op in OPS]
    for backend in ("numba", "triton", "cutlass")
}


class BackendError(RuntimeError):
    """A backend was asked for an input it cannot serve, or is not available here."""


@dataclass(frozen=True)
class Backend:
    """One implementation of one op."""

    op: str
    name: str
    devices: tuple[str, ...]
    launcher: Callable[..., Any]
    supports: Callable[..., str | None] = field(default=lambda *a, **k: None)
    available: Callable[[], str | None] = field(default=lambda: None)

    def why_not(self, device_type: str, *args: Any, **kwargs: Any) -> str | None:
        """``None`` if this backend can serve the call, else the reason it cannot."""
        if device_type not in self.devices:
            return f"{self.name} runs on {'/'.join(self.devices)}, input is on {device_type}"
        reason = self.available()
        if reason is not None:
            return reason
        return self.supports(*args, **kwargs)


_REGISTRY: dict[str, dict[str, Backend]] = {op: {} for op in OPS}
_IMPORT_ERRORS: dict[str, str] = {}
_LOADED = False
_DECISIONS: dict[tuple, str] = {}
_LAST_CHOICE: dict[str, tuple[str, str]] = {}


def register(
    op: str,
    name: str,
    devices: tuple[str, ...],
    launcher: Callable[..., Any],
    supports: Callable[..., str | None] | None = None,
    available: Callable[[], str | None] | None = None,
) -> Backend:
    """Register ``launcher`` as backend ``name`` of ``op``; returns the entry."""
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if name in ("auto", "reference"):
        raise ValueError(f"backend name {name!r} is reserved")
    entry = Backend(
        op,
        name,
        tuple(devices),
        launcher,
        supports or (lambda *a, **k: None),
        available or (lambda: None),
    )
    _REGISTRY[op][name] = entry
    return entry


def unregister(op: str, name: str) -> None:
    """Remove backend ``name`` of ``op`` (no error if it is not registered)."""
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    _REGISTRY[op].pop(name, None)


def _load_backends() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for backend, modules in _BACKEND_MODULES.items():
        for mod in modules:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name == mod:  # this op has no module for this backend (yet)
                    continue
                _IMPORT_ERRORS[mod] = f"{backend}: {type(e).__name__}: {e}"
            except Exception as e:  # a broken toolchain must not break the reference path
                _IMPORT_ERRORS[mod] = f"{backend}: {type(e).__name__}: {e}"


_REFERENCE = {
    "matmul": reference.matmul,
    "attention": reference.attention,
    "decode_attention": reference.decode_attention,
    "layer_norm": reference.layer_norm,
    "lora_bgmv": reference.lora_bgmv,
}


# The argument checks shared by every backend (the launchers call them too), adapted to the
# public signatures.
_CHECKS: dict[str, Callable[..., None]] = {
    "matmul": lambda a, b, bias=None, activation=None, residual=None, out_dtype=None: (
        reference.check_matmul_args(a, b, bias, activation, residual, out_dtype)
    ),
    "attention": lambda q, k, v, causal=False, scale=None, attn_mask=None: (
        reference.check_attention_args(q, k, v, attn_mask, scale)
    ),
    "decode_attention": lambda q, k_cache, v_cache, cache_lengths, scale=None: (
        reference.check_decode_args(q, k_cache, v_cache, cache_lengths, scale)
    ),
    "layer_norm": lambda x, weight, bias, eps=1e-5, residual=None: reference.check_layer_norm_args(
        x, weight, bias, residual, eps
    ),
    "lora_bgmv": lambda x, a, b, scales, indices, out=None: reference.check_lora_args(
        x, a, b, scales, indices, out
    ),
}


def backends(op: str) -> dict[str, Backend]:
    """All registered backends of ``op`` (``reference`` excluded), by name."""
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    _load_backends()
    return dict(_REGISTRY[op])


def import_errors() -> dict[str, str]:
    """Backend modules that failed to import, with the error (for reports)."""
    _load_backends()
    return dict(_IMPORT_ERRORS)


def shape_key(*args: Any) -> tuple:
    """The part of a call that a decision is keyed on: shapes and dtype of tensor args."""
    return tuple(
        (tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else None for a in args
    )


def record_decision(op: str, device_type: str, key: tuple, backend: str) -> None:
    """Remember a measured choice so ``backend="auto"`` uses it for matching calls."""
    _DECISIONS[(op, device_type, key)] = backend


def clear_decisions() -> None:
    """Forget every recorded decision."""
    _DECISIONS.clear()


def last_choice(op: str) -> tuple[str, str] | None:
    """``(backend, reason)`` of the latest ``auto`` call of ``op``."""
    return _LAST_CHOICE.get(op)


def _device_of(args: tuple) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def resolve(op: str, backend: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """The launcher that serves this call (raises for an explicit backend that cannot)."""
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend == "reference":
        return _REFERENCE[op]
    device = _device_of(args)
    table = backends(op)
    if backend == "auto":
        chosen = _DECISIONS.get((op, device, shape_key(*args)))
        if chosen is not None and chosen in table:
            reason = table[chosen].why_not(device, *args, **kwargs)
            if reason is None:
                _LAST_CHOICE[op] = (chosen, "measured decision")
                return table[chosen].launcher
            _LAST_CHOICE[op] = ("reference", f"recorded {chosen} cannot serve: {reason}")
        elif chosen == "reference":
            _LAST_CHOICE[op] = ("reference", "measured decision")
        else:
            _LAST_CHOICE[op] = ("reference", "no measured decision for this shape")
        return _REFERENCE[op]
    if backend not in table:
        known = ", ".join(["auto", "reference", *sorted(table)])
        extra = [e for m, e in _IMPORT_ERRORS.items() if e.startswith(backend + ":")]
        hint = f" (failed to import: {extra[0]})" if extra else ""
        raise BackendError(f"backend must be one of {known} for {op}, got {backend!r}{hint}")
    reason = table[backend].why_not(device, *args, **kwargs)
    if reason is not None:
        # A bad argument is reported as such (naming it), not as a backend limit. Checked only
        # on this failure path: the launchers run the same check, so a call that is served
        # pays for it once.
        _CHECKS[op](*args, **kwargs)
        raise BackendError(f"backend={backend!r} cannot serve this {op}: {reason}")
    return table[backend].launcher


def dispatch(op: str, backend: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` with ``backend`` (``"auto"``, ``"reference"`` or a registered name)."""
    return resolve(op, backend, *args, **kwargs)(*args, **kwargs)
