"""What differs between the model families a training step is optimized for.

One :class:`Family` per kind of model: how its training batch looks (``input_ids``,
``labels`` and for transformers an ``attention_mask``), where its language-model head is,
its loss as the original computes it, and the same loss through a fused head
(:class:`FusedLMHead`) that receives the final hidden states instead of the logits.

* ``SimpleTransformerModel``: labels are aligned with the positions (``labels[:, t]`` is the
  target of position ``t``, as :meth:`ArithmeticTask.encode_training` writes them);
* transformers Llama, Qwen2, Mistral and GPT-2 causal LMs: labels as transformers takes them
  (the model shifts them by one), the loss is ``model(..., labels=labels).loss``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.optimization.hf import is_hf_model

HF_TYPES = ("llama", "qwen2", "mistral", "gpt2")


class FusedLMHead(nn.Module):
    """A language-model head whose training loss never materialises the logits.

    It holds the head's own ``weight`` (and ``bias``) Parameters, so ``state_dict`` keys,
    tied embeddings and optimizers see the same tensors; called on hidden states it returns
    the logits as the ``nn.Linear`` it replaces did. :meth:`loss` gives the mean
    cross-entropy through ``loss_fn(hidden, weight, labels, bias, ignore_index=...)``.
    """

    def __init__(self, linear: nn.Linear, loss_fn, name: str, chunk_size: int | None) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.loss_fn = loss_fn
        self.kernel = name
        self.chunk_size = chunk_size
        self._tap = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._tap:  # the family's loss asked for the hidden states
            return x
        return F.linear(x, self.weight, self.bias)

    @contextlib.contextmanager
    def tap(self):
        """Inside, calling the head returns its input (the final hidden states)."""
        self._tap = True
        try:
            yield
        finally:
            self._tap = False

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
        """Mean cross-entropy of the logits of ``hidden`` ``(rows, hidden)`` at ``labels``."""
        kw = {"ignore_index": ignore_index}
        if self.chunk_size is not None:
            kw["chunk_size"] = self.chunk_size
        return self.loss_fn(hidden, self.weight, labels, self.bias, **kw)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, loss through {self.kernel}"


class Family:
    """The protocol; one subclass per family (no instance state)."""

    name = ""
    head_path = ""

    @classmethod
    def claims(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def why_not(cls, model: nn.Module) -> str | None:
        head = cls.head(model)
        if not isinstance(head, (nn.Linear, FusedLMHead)):
            return f"its output head is a {type(head).__name__}, not an nn.Linear"
        return None

    @classmethod
    def head(cls, model: nn.Module) -> nn.Module:
        return model.get_submodule(cls.head_path)

    @classmethod
    def set_head(cls, model: nn.Module, head: nn.Module) -> None:
        parent, _, leaf = cls.head_path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, head)

    @classmethod
    def vocab_size(cls, model: nn.Module) -> int:
        return cls.head(model).weight.shape[0]

    @classmethod
    def loss(cls, model: nn.Module, batch: dict[str, Any], ignore_index: int = -100):
        raise NotImplementedError


class STM(Family):
    """``SimpleTransformerModel``: ``(input_ids, labels)`` with position-aligned labels."""

    name = "SimpleTransformerModel"
    head_path = "head"

    @classmethod
    def claims(cls, model):
        return isinstance(model, SimpleTransformerModel)

    @classmethod
    def loss(cls, model, batch, ignore_index=-100):
        ids, labels = batch["input_ids"], batch["labels"]
        head = cls.head(model)
        if isinstance(head, FusedLMHead):
            with head.tap():
                hidden, _ = model(ids)
            return head.loss(hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), ignore_index)
        logits, _ = model(ids)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index
        )


class HFCausalLM(Family):
    """transformers Llama/Qwen2/Mistral/GPT-2 causal LMs: ``model(..., labels=).loss``."""

    name = "transformers causal LM"

    @classmethod
    def claims(cls, model):
        return is_hf_model(model)

    @classmethod
    def why_not(cls, model):
        mt = getattr(model.config, "model_type", None)
        if mt not in HF_TYPES:
            return f"model_type {mt!r} is not one of {HF_TYPES}"
        if getattr(model.config, "quantization_config", None) is not None:
            return "quantized checkpoint: the fused head reads plain float weights"
        if not hasattr(model, getattr(model, "base_model_prefix", "") or "\0"):
            return "no base model under base_model_prefix"
        return super().why_not(model)

    @classmethod
    def head(cls, model):
        return model.get_output_embeddings()

    @classmethod
    def set_head(cls, model, head):
        model.set_output_embeddings(head)

    @classmethod
    def loss(cls, model, batch, ignore_index=-100):
        head = cls.head(model)
        kw = {k: v for k, v in batch.items() if k != "labels"}
        if not isinstance(head, FusedLMHead):
            return model(**kw, labels=batch["labels"]).loss
        return hf_fused_loss(model, head, batch["labels"], kw, ignore_index)


def hf_fused_loss(model, head: FusedLMHead, labels, inputs: dict, ignore_index: int = -100):
    """transformers' causal-LM loss (targets shifted by one) through the fused head."""
    base = getattr(model, model.base_model_prefix)
    hidden = base(**inputs, use_cache=False).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return head.loss(h, labels[:, 1:].reshape(-1), ignore_index)


FAMILIES: tuple[type[Family], ...] = (STM, HFCausalLM)


def find(model: nn.Module) -> tuple[type[Family] | None, str | None]:
    """``(family, None)`` if one serves ``model``, else ``(family or None, reason)``."""
    for fam in FAMILIES:
        if fam.claims(model):
            return fam, fam.why_not(model)
    return None, (
        f"{type(model).__name__} is neither a SimpleTransformerModel nor a transformers "
        f"causal LM of type {HF_TYPES}"
    )


def causal_lm_loss(model: nn.Module, batch: dict[str, Any], ignore_index: int = -100):
    """The mean next-token cross-entropy of ``model`` on ``batch``, the way training takes it.

    For a model from :func:`ryzen_opt.optimize_training` it goes through the fused head
    (no logits tensor); for any other model it is the original computation: the logits and
    ``F.cross_entropy`` for ``SimpleTransformerModel``, ``model(..., labels=).loss`` for a
    transformers model.

    Args:
        model: a ``SimpleTransformerModel`` or a transformers Llama/Qwen2/Mistral/GPT-2
            causal LM (optimized or not).
        batch: ``{"input_ids", "labels"}`` (and ``"attention_mask"`` for transformers), or
            an ``(input_ids, labels)`` pair. ``SimpleTransformerModel`` labels are aligned
            with the positions; transformers labels are shifted by the model.
        ignore_index: the label of positions without a loss.

    Returns:
        The scalar loss (differentiable).
    """
    fam, why = find(model)
    if fam is None or why is not None:
        raise ValueError(f"model cannot be served: {why}")
    return fam.loss(model, as_batch(batch), ignore_index)


def as_batch(batch: Any, name: str = "batch") -> dict[str, Any]:
    """``batch`` as a dict; an ``(input_ids, labels)`` pair is named."""
    if isinstance(batch, dict):
        unknown = sorted(set(batch) - {"input_ids", "labels", "attention_mask"})
        if unknown or "input_ids" not in batch or "labels" not in batch:
            raise ValueError(
                f"{name} must have keys input_ids, labels (and optionally attention_mask), "
                f"got {sorted(batch)}"
            )
        return dict(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return {"input_ids": batch[0], "labels": batch[1]}
    raise TypeError(
        f"{name} must be a dict with input_ids and labels or an (input_ids, labels) pair, "
        f"got {type(batch).__name__}"
    )


def check_batch(
    batch: Any, vocab: int, device: torch.device, ignore_index: int, name: str = "example_batch"
) -> dict[str, Any]:
    """Validate a training batch; errors name ``name[key]`` and what was expected."""
    b = as_batch(batch, name)
    ids = b["input_ids"]
    for key, t in b.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name}[{key!r}] is on {t.device}, the model on {device}")
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(
            f"{name}['input_ids'] must be a non-empty 2-D int64/int32 tensor (batch, seq), "
            f"got {ids.dtype} {tuple(ids.shape)}"
        )
    for key in ("labels", "attention_mask"):
        t = b.get(key)
        if t is not None and t.shape != ids.shape:
            raise ValueError(
                f"{name}[{key!r}] must have input_ids' shape {tuple(ids.shape)}, "
                f"got {tuple(t.shape)}"
            )
    labels = b["labels"]
    if labels.dtype != torch.int64:
        raise TypeError(f"{name}['labels'] must be int64 (torch.long), got {labels.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(
            f"{name}['input_ids'] must lie in [0, {vocab}), got min {int(ids.min())} "
            f"max {int(ids.max())}"
        )
    keep = labels[labels != ignore_index]
    if keep.numel() == 0:
        raise ValueError(f"{name}['labels'] holds no position with a loss (all {ignore_index})")
    if int(keep.min()) < 0 or int(keep.max()) >= vocab:
        raise ValueError(
            f"{name}['labels'] must lie in [0, {vocab}) or equal ignore_index={ignore_index}, "
            f"got min {int(keep.min())} max {int(keep.max())}"
        )
    return b
