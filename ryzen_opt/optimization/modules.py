"""Replacement modules that ``optimize()`` swaps in, and the kernel calls they share.

Each module routes a call to a registry backend only when the call falls inside what was
measured for it (a :class:`Route`: case, device, dtype and the measured range of its
sizes); every other call runs the original PyTorch computation. Parameters are the
original ``Parameter`` objects under the original attribute names, so ``state_dict`` keys
(and tied weights) are unchanged.

The functions ``linear_call``, ``layer_norm_call`` and ``attention_call`` are the single
definition of how a backend is invoked: the optimizer verifies and times exactly them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ryzen_opt.kernels import registry
from ryzen_opt.kernels.reference import apply_activation
from ryzen_opt.models.attention import attention_case, causal_self_attention, sdpa_core


@dataclass(frozen=True)
class Route:
    """When a replacement module sends a call to ``backend`` instead of the original.

    Args:
        case: ``"prefill"`` or ``"decode"``.
        op: registry op the backend implements.
        backend: registry backend name.
        device: torch device type the decision was measured on.
        dtype: dtype name the decision was measured in.
        bounds: ``(dim, lo, hi)``: the call's ``dim`` must lie in the measured ``[lo, hi]``.
        packed: the backend takes the weight pre-transposed to ``(in, out)`` contiguous.
    """

    case: str
    op: str
    backend: str
    device: str
    dtype: str
    bounds: tuple[tuple[str, int, int], ...]
    packed: bool = False

    def matches(self, case: str, device: str, dtype: torch.dtype, dims: dict[str, int]) -> bool:
        if case != self.case or device != self.device or str(dtype)[6:] != self.dtype:
            return False
        return all(lo <= dims.get(name, -1) <= hi for name, lo, hi in self.bounds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "op": self.op,
            "backend": self.backend,
            "device": self.device,
            "dtype": self.dtype,
            "bounds": [list(b) for b in self.bounds],
            "packed": self.packed,
        }


@dataclass
class _Router:
    routes: list[tuple[Route, Callable[..., Any]]] = field(default_factory=list)

    @classmethod
    def build(cls, routes: Sequence[Route]) -> _Router:
        return cls([(r, registry.backends(r.op)[r.backend].launcher) for r in routes])

    def find(self, case, device, dtype, dims) -> tuple[Route, Callable[..., Any]] | None:
        for route, launcher in self.routes:
            if route.matches(case, device, dtype, dims):
                return route, launcher
        return None


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------- kernel calls


def linear_baseline(x, weight, bias, activation):
    """The original computation: ``activation(F.linear(x, weight, bias))``."""
    return apply_activation(F.linear(x, weight, bias), activation)


def linear_call(launcher, x, weight_t, bias, activation):
    """``activation(x @ weight_t + bias)`` through a matmul launcher, any leading dims."""
    k = x.shape[-1]
    y = launcher(x.reshape(-1, k), weight_t, bias, activation, None, None)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def linear_args(x, weight_t, bias, activation) -> tuple:
    """The launcher's positional arguments (for ``supports``)."""
    return (x.reshape(-1, x.shape[-1]), weight_t, bias, activation, None, None)


def layer_norm_call(launcher, x, weight, bias, eps):
    return launcher(x, weight, bias, eps, None)


def attention_call(op, launcher, q, k, v, causal, scale=None, mask=None):
    """Attention ``(B, H, Lq, D)`` through an ``attention`` or ``decode_attention`` launcher."""
    if op == "attention":
        return launcher(q, k, v, causal, scale, mask)
    lengths = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
    return launcher(q[:, :, 0], k, v, lengths, scale)[:, :, None]


def attention_args(op, q, k, v, causal, scale=None, mask=None) -> tuple:
    if op == "attention":
        return (q, k, v, causal, scale, mask)
    lengths = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
    return (q[:, :, 0], k, v, lengths, scale)


# ----------------------------------------------------------------------------- modules


class FusedLinear(nn.Linear):
    """``nn.Linear`` (with an optional fused activation) served by measured backends.

    Holds the original ``weight``/``bias`` Parameters under the same names. Calls outside
    the measured routes, and calls that need autograd, run ``activation(F.linear(...))``.

    Args:
        linear: the module to wrap (its parameters are shared, not copied).
        routes: where a backend is used.
        activation: applied after the bias (``None``, ``"gelu"``, ...), as the original
            model did right after this layer.

    Example:
        >>> import torch
        >>> from ryzen_opt.optimization.modules import FusedLinear
        >>> m = FusedLinear(torch.nn.Linear(4, 3), routes=[])
        >>> m(torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, linear: nn.Linear, routes: Sequence[Route], activation: str | None = None
    ) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.activation = activation
        self.routes = list(routes)
        self._router = _Router.build(self.routes)
        self.register_buffer("_packed", None, persistent=False)
        self._packed_key: tuple | None = None

    def _weight_t(self, packed: bool) -> torch.Tensor:
        w = self.weight
        if not packed:
            return w.t()
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._packed is None or self._packed_key != key:
            with torch.no_grad():
                self._packed = w.detach().t().contiguous()
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._router.routes and not _needs_autograd(x, self.weight, self.bias):
            rows = x.numel() // max(self.in_features, 1)
            hit = self._router.find("any", x.device.type, x.dtype, {"rows": rows})
            if hit is not None:
                route, launcher = hit
                return linear_call(
                    launcher, x, self._weight_t(route.packed), self.bias, self.activation
                )
        return linear_baseline(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        backends = sorted({r.backend for r in self.routes})
        return f"{super().extra_repr()}, activation={self.activation}, backends={backends}"


class OptimizedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` served by measured ``layer_norm`` backends (same parameters).

    Args:
        norm: the module to wrap (parameters shared).
        routes: where a backend is used.

    Example:
        >>> import torch
        >>> from ryzen_opt.optimization.modules import OptimizedLayerNorm
        >>> OptimizedLayerNorm(torch.nn.LayerNorm(4), routes=[])(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, norm: nn.LayerNorm, routes: Sequence[Route]) -> None:
        nn.Module.__init__(self)
        self.normalized_shape = norm.normalized_shape
        self.eps = norm.eps
        self.elementwise_affine = norm.elementwise_affine
        self.weight = norm.weight
        self.bias = norm.bias
        self.routes = list(routes)
        self._router = _Router.build(self.routes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._router.routes and not _needs_autograd(x, self.weight, self.bias):
            rows = x.numel() // max(x.shape[-1], 1)
            hit = self._router.find("any", x.device.type, x.dtype, {"rows": rows})
            if hit is not None:
                return layer_norm_call(hit[1], x, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class FusedMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with the activation fused into ``fc1`` (a :class:`FusedLinear`).

    Built only for MLP classes whose forward is known to be exactly that (the baseline's
    ``MLP``), so the fusion cannot change what the model computes.
    """

    def __init__(self, fc1: FusedLinear, fc2: nn.Module) -> None:
        super().__init__()
        self.fc1 = fc1
        self.fc2 = fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class OptimizedSelfAttention(nn.Module):
    """The baseline's causal self-attention with the attention core served by a backend.

    Keeps ``qkv`` and ``proj`` as submodules (same ``state_dict`` keys) and the same
    ``forward(x, past) -> (y, (k, v))`` contract. Prefill and one-token decode steps inside
    the measured batch and length ranges use the chosen backend; chunks after a cache,
    training with dropout, and unmeasured shapes run the original SDPA code.
    """

    def __init__(self, attn: nn.Module, routes: Sequence[Route]) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.qkv = attn.qkv
        self.proj = attn.proj
        self.dropout = attn.dropout
        self.routes = list(routes)
        self._router = _Router.build(self.routes)

    def forward(self, x: torch.Tensor, past=None):
        return causal_self_attention(self, x, past, core=functools.partial(self._core, x))

    def _core(self, x: torch.Tensor, q, k, v, dropout_p: float) -> torch.Tensor:
        """The chosen backend where a route serves this call, else the baseline's SDPA."""
        case = attention_case(q.shape[2], k.shape[2] - q.shape[2])
        if case is not None and dropout_p == 0.0 and not _needs_autograd(q, k, v):
            dims = {"batch": x.shape[0], "kv_len": k.shape[2]}
            hit = self._router.find(case, x.device.type, x.dtype, dims)
            if hit is not None:
                route, launcher = hit
                causal = case == "prefill" and q.shape[2] > 1
                return attention_call(route.op, launcher, q, k, v, causal=causal)
        return sdpa_core(q, k, v, dropout_p)
