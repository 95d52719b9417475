"""The candidates ``optimize_training()`` measures: each swaps one part of the training step.

A candidate registers itself (:func:`candidate`) with its name, the part of the step it
replaces (``kind``: one candidate per kind is kept), the devices it runs on, ``why_not``
(``None`` or the reason it cannot serve a model) and ``install`` (swaps it into a model,
returns the undo). The measuring (:mod:`ryzen_opt.training.optimize`) never branches on a
candidate's name.

CPU: ``chunked_lce``, the fused linear + cross-entropy of :mod:`ryzen_opt.training.lce`,
and the opt-in ``compiled_head`` (``torch.compile`` of the original head + loss). CUDA: the
Triton training kernels of ``ryzen_opt.kernels.triton.training`` (fused linear +
cross-entropy, SwiGLU, GELU, the seed model's LayerNorm fused with the residual, a transformers
model's RMSNorm/LayerNorm modules), imported on first use; where
that package is missing or fails to import, the report says so.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ryzen_opt.training import lce
from ryzen_opt.training.families import STM, Family, FusedLMHead, HFCausalLM, hf_fused_loss

KINDS = ("loss head", "mlp activation", "norm + residual")
GPU_OPS = "ryzen_opt.kernels.triton.training"


@dataclass(frozen=True)
class Candidate:
    """One registered candidate (see the module docstring)."""

    name: str
    kind: str
    devices: tuple[str, ...]
    why_not: Callable[[nn.Module, type[Family]], str | None]
    install: Callable[[nn.Module, type[Family], Any], Callable[[], None]]
    # False: tried only when named in TrainingConfig.candidates (its cost is in the reason)
    default: bool = True
    opt_in_reason: str = ""


CANDIDATES: dict[str, Candidate] = {}


def candidate(name, kind, devices, default=True, opt_in_reason=""):
    """Register ``(why_not, install)`` as candidate ``name``: a decorator of a class."""

    def wrap(cls):
        CANDIDATES[name] = Candidate(
            name, kind, tuple(devices), cls.why_not, cls.install, default, opt_in_reason
        )
        return cls

    return wrap


def gpu_ops() -> tuple[Any, str | None]:
    """The Triton training-kernel module, or ``(None, why it is not there)``."""
    try:
        return importlib.import_module(GPU_OPS), None
    except Exception as e:  # missing, or Triton/CUDA absent: the candidates are skipped
        return None, f"{GPU_OPS} not importable: {type(e).__name__}: {e}"


def _gpu_op(name: str) -> tuple[Any, str | None]:
    mod, why = gpu_ops()
    if mod is None:
        return None, why
    fn = getattr(mod, name, None)
    return (fn, None) if fn is not None else (None, f"{GPU_OPS} has no {name}")


def _swap(model: nn.Module, replacements: dict[str, nn.Module]) -> Callable[[], None]:
    """Put ``replacements`` (path -> module) into ``model``; the undo puts the old ones back."""
    old = {p: model.get_submodule(p) for p in replacements}

    def put(table):
        for path, mod in table.items():
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, mod)

    put(replacements)
    return lambda: put(old)


# ---------------------------------------------------------------- the loss head


@functools.cache
def _training_class(cls: type) -> type:
    """A subclass of a transformers causal LM whose ``forward(..., labels=)`` takes the loss
    through the fused head while training (``logits`` is then ``None``, as in Liger-Kernel);
    every other call runs the original ``forward``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    plain = {"position_ids", "use_cache", "return_dict"}

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kw):
        head = self.get_output_embeddings()
        if (
            labels is not None
            and self.training
            and torch.is_grad_enabled()
            and isinstance(head, FusedLMHead)
            and set(kw) <= plain
            and kw.get("return_dict", True) is not False
        ):
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if kw.get("position_ids") is not None:
                inputs["position_ids"] = kw["position_ids"]
            return CausalLMOutputWithPast(loss=hf_fused_loss(self, head, labels, inputs))
        return cls.forward(
            self, input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw
        )

    return type(cls.__name__, (cls,), {"forward": forward, "__doc__": cls.__doc__})


def _install_head(model, fam, loss_fn, name, chunk_size):
    old = fam.head(model)
    if isinstance(old, FusedLMHead):
        raise ValueError("the head is already fused")
    fam.set_head(model, FusedLMHead(old, loss_fn, name, chunk_size))
    cls = type(model)
    if fam is HFCausalLM:
        model.__class__ = _training_class(cls)

    def undo():
        fam.set_head(model, old)
        model.__class__ = cls

    return undo


@candidate("chunked_lce", "loss head", ("cpu",))
class _ChunkedLCE:
    @staticmethod
    def why_not(model, fam):
        return None

    @staticmethod
    def install(model, fam, config):
        return _install_head(model, fam, lce.linear_cross_entropy, "chunked_lce", config.chunk_size)


def _eager_head_loss(hidden, weight, labels, bias=None, *, ignore_index=-100, chunk_size=None):
    return F.cross_entropy(
        F.linear(hidden, weight, bias).float(), labels, ignore_index=ignore_index
    )


@candidate(
    "compiled_head",
    "loss head",
    ("cpu", "cuda"),
    default=False,
    opt_in_reason="compiling it took 26 s on 2 cores and it ran 1.01x [0.90, 1.10] of eager "
    "on the seed model's head",
)
class _CompiledHead:
    @staticmethod
    def why_not(model, fam):
        return None

    @staticmethod
    def install(model, fam, config):
        fn = torch.compile(_eager_head_loss, dynamic=True)
        return _install_head(model, fam, fn, "compiled_head", None)


@candidate("triton_lce", "loss head", ("cuda",))
class _TritonLCE:
    @staticmethod
    def why_not(model, fam):
        return _gpu_op("linear_cross_entropy")[1]

    @staticmethod
    def install(model, fam, config):
        fn = _gpu_op("linear_cross_entropy")[0]
        return _install_head(model, fam, fn, "triton_lce", config.chunk_size)


# ---------------------------------------------------------------- MLP activations


class _GeluMLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` (the seed model's MLP) with a fused GELU; same submodules."""

    def __init__(self, mlp: nn.Module, gelu) -> None:
        super().__init__()
        self.fc1, self.fc2, self._gelu = mlp.fc1, mlp.fc2, gelu

    def forward(self, x):
        return self.fc2(self._gelu(self.fc1(x), approximate="none"))


class _GeluConvMLP(nn.Module):
    """GPT-2's MLP (``dropout(c_proj(act(c_fc(x))))``) with a fused GELU; same submodules."""

    def __init__(self, mlp: nn.Module, gelu, approximate: str) -> None:
        super().__init__()
        self.c_fc, self.c_proj, self.dropout = mlp.c_fc, mlp.c_proj, mlp.dropout
        self._gelu, self._approximate = gelu, approximate

    def forward(self, x):
        return self.dropout(self.c_proj(self._gelu(self.c_fc(x), approximate=self._approximate)))


class _SwiGLUMLP(nn.Module):
    """Llama's MLP (``down(silu(gate(x)) * up(x))``) with a fused SwiGLU; same submodules."""

    def __init__(self, mlp: nn.Module, swiglu) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self._swiglu = swiglu

    def forward(self, x):
        return self.down_proj(self._swiglu(self.gate_proj(x), self.up_proj(x)))


_GPT2_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _mlps(model, fam):
    """``{path: (mlp, how)}`` of the model's MLPs, or a reason."""
    if fam is STM:
        return {f"blocks.{i}.mlp": (b.mlp, "none") for i, b in enumerate(model.blocks)}, None
    mt = model.config.model_type
    if mt == "gpt2":
        act = model.config.activation_function
        if act not in _GPT2_GELU:
            return None, f"GPT-2 activation {act!r} is not a GELU"
        return {
            f"transformer.h.{i}.mlp": (blk.mlp, _GPT2_GELU[act])
            for i, blk in enumerate(model.transformer.h)
        }, None
    act = getattr(model.config, "hidden_act", None)
    if act != "silu":
        return None, f"hidden_act {act!r} is not silu"
    return {
        f"model.layers.{i}.mlp": (layer.mlp, "swiglu") for i, layer in enumerate(model.model.layers)
    }, None


@candidate("triton_gelu", "mlp activation", ("cuda",))
class _TritonGelu:
    @staticmethod
    def why_not(model, fam):
        mlps, why = _mlps(model, fam)
        if why is None and any(how == "swiglu" for _, how in mlps.values()):
            why = "the MLP is gated (SwiGLU), not a GELU"
        return why or _gpu_op("gelu")[1]

    @staticmethod
    def install(model, fam, config):
        gelu = _gpu_op("gelu")[0]
        mlps, _ = _mlps(model, fam)
        new = {
            p: _GeluMLP(m, gelu) if fam is STM else _GeluConvMLP(m, gelu, how)
            for p, (m, how) in mlps.items()
        }
        return _swap(model, new)


@candidate("triton_swiglu", "mlp activation", ("cuda",))
class _TritonSwiGLU:
    @staticmethod
    def why_not(model, fam):
        mlps, why = _mlps(model, fam)
        if why is None and any(how != "swiglu" for _, how in mlps.values()):
            why = "the MLP is not gated (GELU)"
        return why or _gpu_op("swiglu")[1]

    @staticmethod
    def install(model, fam, config):
        swiglu = _gpu_op("swiglu")[0]
        mlps, _ = _mlps(model, fam)
        return _swap(model, {p: _SwiGLUMLP(m, swiglu) for p, (m, _) in mlps.items()})


# ---------------------------------------------------------------- norm + residual


class _NormResidualBlock(nn.Module):
    """The seed model's block with its second LayerNorm fused with the residual add before
    it: ``(y, h) = layer_norm_residual(drop(a), x)`` gives ``h = x + drop(a)`` and
    ``y = ln2(h)`` in one pass. Same submodules, so the same ``state_dict``."""

    def __init__(self, block: nn.Module, fused) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = block.ln1, block.attn, block.ln2
        self.mlp, self.drop = block.mlp, block.drop
        self._fused = fused

    def forward(self, x, past=None):
        a, present = self.attn(self.ln1(x), past)
        y, h = self._fused(self.drop(a), x, self.ln2.weight, self.ln2.bias, self.ln2.eps)
        return h + self.drop(self.mlp(y)), present


@candidate("triton_norm_residual", "norm + residual", ("cuda",))
class _TritonNormResidual:
    @staticmethod
    def why_not(model, fam):
        if fam is not STM:
            return (
                "wired for the seed model's blocks only (a transformers decoder layer's "
                "forward differs between transformers 4.x and 5.x)"
            )
        return _gpu_op("layer_norm_residual")[1]

    @staticmethod
    def install(model, fam, config):
        fused = _gpu_op("layer_norm_residual")[0]
        return _swap(
            model,
            {f"blocks.{i}": _NormResidualBlock(b, fused) for i, b in enumerate(model.blocks)},
        )


class _TritonRMSNorm(nn.Module):
    """A transformers ``*RMSNorm`` (``weight * x / rms(x)``) through the fused Triton op.

    Same ``weight`` Parameter, so the same ``state_dict``. The op multiplies by the weight in
    float32 and rounds once, where transformers rounds the normalised row to the input dtype
    first: identical in float32, a half-ulp closer to exact in 16-bit dtypes."""

    def __init__(self, norm: nn.Module, op) -> None:
        super().__init__()
        self.weight, self.variance_epsilon, self._op = norm.weight, norm.variance_epsilon, op

    def forward(self, x):
        return self._op(x, None, self.weight, self.variance_epsilon)[0]


class _TritonLayerNorm(nn.Module):
    """An ``nn.LayerNorm`` (GPT-2's ``ln_1``/``ln_2``/``ln_f``) through the fused Triton op;
    same ``weight``/``bias`` Parameters."""

    def __init__(self, norm: nn.LayerNorm, op) -> None:
        super().__init__()
        self.weight, self.bias, self.eps, self._op = norm.weight, norm.bias, norm.eps, op
        self.normalized_shape = norm.normalized_shape

    def forward(self, x):
        return self._op(x, None, self.weight, self.bias, self.eps)[0]


def _hf_norms(model) -> tuple[dict[str, tuple[nn.Module, str]] | None, str | None]:
    """``{path: (norm, "rms" | "layer")}`` of a transformers model's norms, or a reason."""
    found: dict[str, tuple[nn.Module, str]] = {}
    for path, m in model.named_modules():
        name = type(m).__name__
        if name.endswith("RMSNorm"):
            w = getattr(m, "weight", None)
            if not isinstance(w, nn.Parameter) or not hasattr(m, "variance_epsilon"):
                return None, f"{path} ({name}) is not a weight * x / rms(x) norm"
            if list(m.named_children()):
                return None, f"{path} ({name}) has submodules: not a plain RMSNorm"
            found[path] = (m, "rms")
        elif isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1 or not m.elementwise_affine:
                return None, f"{path}: a LayerNorm over {tuple(m.normalized_shape)} without affine"
            found[path] = (m, "layer")
    if not found:
        return None, "no RMSNorm or LayerNorm modules found"
    return found, None


@candidate("triton_norm", "norm + residual", ("cuda",))
class _TritonNorm:
    """Every norm of a transformers model through the fused Triton kernels (one pass forward,
    one backward, weight gradients summed in float32); the residual add stays the layer's."""

    @staticmethod
    def why_not(model, fam):
        if fam is STM:
            return "the seed model's norms go through triton_norm_residual"
        norms, why = _hf_norms(model)
        if why is not None:
            return why
        ops = {"rms": "rms_norm_residual", "layer": "layer_norm_residual"}
        for how in sorted({how for _, how in norms.values()}):
            if (why := _gpu_op(ops[how])[1]) is not None:
                return why
        return None

    @staticmethod
    def install(model, fam, config):
        norms, _ = _hf_norms(model)
        rms, layer = _gpu_op("rms_norm_residual")[0], _gpu_op("layer_norm_residual")[0]
        return _swap(
            model,
            {
                p: _TritonRMSNorm(m, rms) if how == "rms" else _TritonLayerNorm(m, layer)
                for p, (m, how) in norms.items()
            },
        )
