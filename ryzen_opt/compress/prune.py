"""Pruning of ``SimpleTransformerModel``: magnitude (unstructured), structured, 2:4.

* :func:`magnitude_prune` zeroes the smallest weights of the block linears. The tensors stay
  dense, so neither PyTorch nor ONNX Runtime runs faster and the ``.onnx`` file keeps its
  size (only a generic compressor such as zip shrinks it); it is here to be measured.
* :func:`structured_prune` scores attention heads and FFN channels on a calibration pass and
  physically removes the weakest: the result is a smaller model with the same interface
  (``forward(idx, kv_cache)``, ``generate``), exportable with ``export_onnx``. Heads keep
  their ``head_dim``, so a pruned attention has ``heads * head_dim < embedding_dim`` and uses
  :class:`PrunedAttention` instead of the baseline's attention class.
* :func:`semi_structured_24` prunes the block linears to the 2:4 pattern and stores them as
  ``torch.sparse.to_sparse_semi_structured`` tensors (CUDA sparse tensor cores only).

``compression_ratio`` is the fraction of the prunable weights removed: the weight matrices of
the attention (qkv, proj) and FFN (fc1, fc2) linears of every block. Embeddings, the tied
output head, biases and norms are not counted.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ryzen_opt.models.attention import causal_self_attention, qkv_heads
from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.models.tasks import ArithmeticTask

_KINDS = ("structured", "magnitude")


@dataclass
class PruneConfig:
    """How to prune.

    Args:
        kind: ``"structured"`` (remove heads and FFN channels) or ``"magnitude"`` (zero the
            smallest weights, unstructured).
        compression_ratio: fraction of the prunable weights to remove, in [0, 1).
        calibration_samples: task problems (train split) run to score heads and channels.
        finetune_steps: recovery fine-tune steps on the task's train split (0: none).
        finetune_lr: peak learning rate of the fine-tune (cosine to 10%).
        finetune_batch_size: problems per fine-tune step.
        seed: seeds calibration data and fine-tune batches.
    """

    kind: str = "structured"
    # 0.3: the default; removes ~1 head in 4 and ~35% of FFN channels per block.
    compression_ratio: float = 0.3
    calibration_samples: int = 256
    finetune_steps: int = 0
    # 3e-4: a third of the training lr; enough to recover without undoing the pretraining.
    finetune_lr: float = 3e-4
    finetune_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        check_ratio(self.compression_ratio)
        for name in ("calibration_samples", "finetune_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        v = self.finetune_steps
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"finetune_steps must be an int >= 0, got {v!r}")
        if (
            isinstance(self.finetune_lr, bool)
            or not isinstance(self.finetune_lr, (int, float))
            or (not self.finetune_lr > 0)
        ):
            raise ValueError(f"finetune_lr must be > 0, got {self.finetune_lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_ratio(ratio: Any, name: str = "compression_ratio") -> float:
    """Validate a pruning ratio in [0, 1); raise naming ``name``."""
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, (int, float))
        or not (0.0 <= ratio < 1.0)
        or math.isnan(ratio)
    ):
        raise ValueError(f"{name} must be a float in [0, 1), got {ratio!r}")
    return float(ratio)


def _check_model(model: Any) -> None:
    if not isinstance(model, SimpleTransformerModel):
        raise TypeError(f"model must be a SimpleTransformerModel, got {type(model).__name__}")


def _check_task(task: Any) -> None:
    if not isinstance(task, ArithmeticTask):
        raise TypeError(f"task must be an ArithmeticTask, got {type(task).__name__}")


def prunable_linears(model: SimpleTransformerModel) -> list[nn.Linear]:
    """The block linears whose weights count toward ``compression_ratio``."""
    out = []
    for b in model.blocks:
        out += [b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2]
    return out


def prunable_weight_count(model: SimpleTransformerModel) -> int:
    """Weights in the prunable linears (biases excluded)."""
    return sum(lin.weight.numel() for lin in prunable_linears(model))


def sparsity(model: SimpleTransformerModel) -> float:
    """Fraction of zeros among the prunable weights."""
    ws = [lin.weight for lin in prunable_linears(model)]
    return float(sum((w == 0).sum().item() for w in ws) / sum(w.numel() for w in ws))


# -- magnitude ----------------------------------------------------------------------------


def magnitude_prune(
    model: SimpleTransformerModel, compression_ratio: float = 0.3
) -> tuple[SimpleTransformerModel, dict[str, torch.Tensor]]:
    """Zero the smallest-magnitude weights of the block linears (global threshold).

    Args:
        model: the model (not modified: a pruned copy is returned).
        compression_ratio: fraction of the prunable weights set to zero, in [0, 1).

    Returns:
        ``(pruned_model, masks)``: the copy and, per linear parameter name, a bool mask of
        the weights kept (for a fine-tune that keeps them zero).
    """
    _check_model(model)
    ratio = check_ratio(compression_ratio)
    pruned = copy.deepcopy(model).eval()
    lins = prunable_linears(pruned)
    flat = torch.cat([lin.weight.detach().abs().flatten() for lin in lins])
    k = int(round(ratio * flat.numel()))
    masks: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in pruned.named_parameters()}
    thresh = -1.0 if k == 0 else float(torch.kthvalue(flat.float().cpu(), k).values)
    with torch.no_grad():
        for lin in lins:
            keep = lin.weight.abs() > thresh
            lin.weight.mul_(keep)
            masks[names[id(lin.weight)]] = keep
    return pruned, masks


# -- structured ---------------------------------------------------------------------------


class PrunedAttention(nn.Module):
    """Causal self-attention with ``num_heads * head_dim`` possibly below the model width.

    Same computation and cache layout as the baseline's attention; only the widths differ.
    """

    def __init__(self, embedding_dim: int, num_heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qkv = nn.Linear(embedding_dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, embedding_dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, past=None):
        return causal_self_attention(self, x, past)


def _calibration_batch(task: ArithmeticTask, n: int, seed: int, device) -> torch.Tensor:
    x, _ = task.encode_training(task.sample("train", n, seed))
    return x.to(device)


@torch.no_grad()
def importance_scores(
    model: SimpleTransformerModel, idx: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block, ``(head_scores, channel_scores)`` from one pass over ``idx``.

    A head's score is the mean norm of its contribution to the residual stream (its output
    through its slice of ``proj``); an FFN channel's is the mean ``|gelu(fc1 x)|`` times the
    norm of its ``fc2`` column: the expected size of what removing it takes away.

    Args:
        model: the model to score.
        idx: ``(batch, seq)`` calibration token ids.

    Returns:
        One ``(heads,)`` and one ``(ff_dim,)`` float tensor per block.
    """
    _check_model(model)
    model.eval()
    t = idx.shape[1]
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(t, device=idx.device))[None]
    out = []
    for block in model.blocks:
        attn = block.attn
        h, d = attn.num_heads, attn.head_dim
        a_in = block.ln1(x)
        q, k, v = qkv_heads(attn, a_in)
        # The heads' outputs before they are merged and projected (each head's share of the
        # residual is scored), so not causal_self_attention, which returns them merged.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, h, t, d)
        w = attn.proj.weight.view(-1, h, d)  # (C, h, d)
        contrib = torch.einsum("bhtd,chd->bhtc", y, w)
        head_scores = contrib.norm(dim=-1).mean(dim=(0, 2))
        x = x + block.attn(a_in)[0]
        m_in = block.ln2(x)
        act = F.gelu(block.mlp.fc1(m_in))
        chan_scores = act.abs().mean(dim=(0, 1)) * block.mlp.fc2.weight.norm(dim=0)
        x = x + block.mlp(m_in)
        out.append((head_scores, chan_scores))
    return out


def _plan(model: SimpleTransformerModel, ratio: float) -> list[tuple[int, int]]:
    # Per block: heads and channels to remove so the block loses ~ratio of its weights.
    plan = []
    c = model.config.embedding_dim
    for b in model.blocks:
        h, d = b.attn.num_heads, b.attn.head_dim
        ff = b.mlp.fc1.out_features
        per_head = 4 * c * d
        total = h * per_head + 2 * c * ff
        kh = min(h - 1, int(round(ratio * h)))
        rest = ratio * total - kh * per_head
        kc = min(ff - 1, max(0, int(round(rest / (2 * c)))))
        plan.append((kh, kc))
    return plan


@torch.no_grad()
def structured_prune(
    model: SimpleTransformerModel,
    task: ArithmeticTask,
    compression_ratio: float = 0.3,
    calibration_samples: int = 256,
    seed: int = 0,
) -> SimpleTransformerModel:
    """Remove the weakest attention heads and FFN channels of every block.

    Each block loses about ``compression_ratio`` of its prunable weights: ``round(ratio *
    heads)`` heads (at least one kept), the rest of the budget in FFN channels. Which ones go
    is decided by :func:`importance_scores` on task problems from the train split.

    Args:
        model: the model (not modified).
        task: the task whose train split provides calibration data.
        compression_ratio: fraction of the prunable weights to remove, in [0, 1).
        calibration_samples: problems in the calibration pass.
        seed: draws the calibration problems.

    Returns:
        A smaller model with the same interface (a ``SimpleTransformerModel`` whose blocks
        use :class:`PrunedAttention` and narrower FFN linears), in eval mode.
    """
    _check_model(model)
    _check_task(task)
    ratio = check_ratio(compression_ratio)
    if (
        isinstance(calibration_samples, bool)
        or not isinstance(calibration_samples, int)
        or (calibration_samples < 1)
    ):
        raise ValueError(f"calibration_samples must be an int >= 1, got {calibration_samples!r}")
    pruned = copy.deepcopy(model).eval()
    dev = pruned.tok_emb.weight.device
    scores = importance_scores(pruned, _calibration_batch(task, calibration_samples, seed, dev))
    c = pruned.config.embedding_dim
    for block, (hs, cs), (kh, kc) in zip(pruned.blocks, scores, _plan(pruned, ratio), strict=True):
        attn = block.attn
        h, d = attn.num_heads, attn.head_dim
        keep_h = torch.sort(torch.topk(hs, h - kh).indices).values
        cols = (keep_h[:, None] * d + torch.arange(d, device=dev)[None]).flatten()
        rows = torch.cat([cols, cols + h * d, cols + 2 * h * d])
        new = PrunedAttention(c, len(keep_h), d, attn.dropout).to(dev)
        new.qkv.weight.copy_(attn.qkv.weight[rows])
        new.qkv.bias.copy_(attn.qkv.bias[rows])
        new.proj.weight.copy_(attn.proj.weight[:, cols])
        new.proj.bias.copy_(attn.proj.bias)
        block.attn = new
        ff = block.mlp.fc1.out_features
        keep_c = torch.sort(torch.topk(cs, ff - kc).indices).values
        fc1 = nn.Linear(c, len(keep_c)).to(dev)
        fc2 = nn.Linear(len(keep_c), c).to(dev)
        fc1.weight.copy_(block.mlp.fc1.weight[keep_c])
        fc1.bias.copy_(block.mlp.fc1.bias[keep_c])
        fc2.weight.copy_(block.mlp.fc2.weight[:, keep_c])
        fc2.bias.copy_(block.mlp.fc2.bias)
        block.mlp.fc1, block.mlp.fc2 = fc1, fc2
    return pruned.eval()


@torch.no_grad()
def prune_vocabulary(
    model: SimpleTransformerModel,
    task: ArithmeticTask,
    calibration_samples: int = 256,
    seed: int = 0,
) -> SimpleTransformerModel:
    """Drop the token rows (embedding and tied output head) the task never uses.

    The ids seen in a calibration pass over train problems (inputs and targets, specials
    included) decide the kept vocabulary: the prefix ``0..max(used)``, so ids keep their
    meaning and no remapping is needed. Greedy decoding over the kept ids can only differ
    from the full model where the full model would emit an id the task never uses.

    Args:
        model: the model (not modified).
        task: provides the calibration problems.
        calibration_samples: problems scanned for used ids.
        seed: draws them.

    Returns:
        A copy with ``config.vocab_size`` set to the kept prefix length.
    """
    _check_model(model)
    _check_task(task)
    x, y = task.encode_training(task.sample("train", calibration_samples, seed))
    tok = task.tokenizer
    used = torch.cat([x.flatten(), y[y >= 0].flatten(), torch.tensor([tok.PAD, tok.BOS, tok.EOS])])
    keep = int(used.max()) + 1
    pruned = copy.deepcopy(model).eval()
    if keep >= pruned.config.vocab_size:
        return pruned
    dev = pruned.tok_emb.weight.device
    emb = nn.Embedding(keep, pruned.config.embedding_dim).to(dev)
    emb.weight.copy_(pruned.tok_emb.weight[:keep])
    head = nn.Linear(pruned.config.embedding_dim, keep, bias=False).to(dev)
    if pruned.config.tie_weights:
        head.weight = emb.weight
    else:
        head.weight.copy_(pruned.head.weight[:keep])
    pruned.tok_emb, pruned.head = emb, head
    pruned.config = dataclasses.replace(pruned.config, vocab_size=keep)
    return pruned


def architecture(model: SimpleTransformerModel) -> list[dict[str, int]]:
    """Per block: heads, head_dim and FFN width (for reports)."""
    return [
        {
            "heads": int(b.attn.num_heads),
            "head_dim": int(b.attn.head_dim),
            "ff_dim": int(b.mlp.fc1.out_features),
        }
        for b in model.blocks
    ]


# -- recovery fine-tune -------------------------------------------------------------------


def finetune(
    model: SimpleTransformerModel,
    task: ArithmeticTask,
    steps: int,
    lr: float = 3e-4,
    batch_size: int = 64,
    seed: int = 0,
    masks: dict[str, torch.Tensor] | None = None,
) -> SimpleTransformerModel:
    """Short next-token fine-tune on the task's train split, in place (loss on answers only).

    Args:
        model: the model to tune (returned in eval mode).
        task: provides train problems and their encoding.
        steps: optimizer steps (0 returns the model untouched).
        lr: peak learning rate; 10% linear warm-up then cosine to 10% of it.
        batch_size: problems per step.
        seed: draws the problems (offset from training's seeds so batches are fresh).
        masks: per parameter name, a bool mask of weights that must stay as they are zeroed
            (magnitude pruning); re-applied after every step.

    Returns:
        ``model``.
    """
    _check_model(model)
    _check_task(task)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if steps == 0:
        return model.eval()
    dev = model.tok_emb.weight.device
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    data = task.sample("train", steps * batch_size, 10_000 + seed)
    warm = max(1, steps // 10)
    model.train()
    for step in range(steps):
        frac = (step - warm) / max(1, steps - warm)
        cur = (
            lr * (step + 1) / warm
            if step < warm
            else lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        )
        for g in opt.param_groups:
            g["lr"] = cur
        x, y = task.encode_training(data[step * batch_size : (step + 1) * batch_size])
        logits, _ = model(x.to(dev))
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.to(dev).reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if masks:
            with torch.no_grad():
                for name, keep in masks.items():
                    params[name].mul_(keep)
    return model.eval()


# -- 2:4 semi-structured (CUDA) -----------------------------------------------------------


def prune_24_mask(weight: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping the 2 largest-magnitude weights of every 4 along the input axis."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"weight must be 2-D with in_features % 4 == 0, got {tuple(weight.shape)}")
    groups = weight.detach().abs().reshape(weight.shape[0], -1, 4)
    top = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(weight.shape)


@torch.no_grad()
def semi_structured_24(
    model: SimpleTransformerModel, dtype: torch.dtype = torch.float16
) -> SimpleTransformerModel:
    """A copy whose block linears hold 2:4-sparse weights for CUDA sparse tensor cores.

    Args:
        model: a model on a CUDA device (not modified).
        dtype: ``torch.float16`` or ``torch.bfloat16`` (what the sparse kernels take).

    Returns:
        The copy, in ``dtype``, with ``to_sparse_semi_structured`` weights in its block linears.
    """
    _check_model(model)
    dev = model.tok_emb.weight.device
    if dev.type != "cuda":
        raise ValueError(f"model must be on a CUDA device for 2:4 sparsity, got {dev}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    from torch.sparse import to_sparse_semi_structured

    out = copy.deepcopy(model).to(dtype).eval()
    for lin in prunable_linears(out):
        w = lin.weight * prune_24_mask(lin.weight)
        lin.weight = nn.Parameter(to_sparse_semi_structured(w.contiguous()), requires_grad=False)
    return out
