"""Fused linear + cross-entropy for the CPU: the logits are never kept for the backward.

``linear_cross_entropy(hidden, weight, labels, bias)`` equals
``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=...)`` (mean over the rows
whose label is not ``ignore_index``), computed in two ways that the training step's
language-model head can use:

* only the rows that carry a loss are multiplied by the head: in the arithmetic task's
  batches the prompt tokens are ``ignore_index`` (about two thirds of the positions), and
  their logits, softmax and gradients are exactly zero work for the loss;
* the gradients of ``hidden``, ``weight`` and ``bias`` are computed in the forward, a chunk
  of rows at a time (Liger-Kernel's fused linear cross-entropy does the same on GPUs): the
  softmax of a chunk becomes its logits' gradient in place, so the ``(rows, vocab)`` logits,
  log-probabilities and their gradient are never all alive, and the backward is one scaling.

Logits are computed in the weights' dtype and the softmax in float32 (as transformers'
loss does after its ``logits.float()``); the loss is float32.
"""

from __future__ import annotations

import torch

__all__ = ["linear_cross_entropy"]

# Rows per chunk, so that a chunk's float32 logits stay about 4 MiB (512 rows at the seed
# model's 2048-token vocabulary, 32 at 32000): a chunk's softmax then stays in the L2/L3
# cache between the matmul that writes it and the two that read it.
CHUNK_BYTES = 4 * 2**20


def _check(hidden, weight, labels, bias, ignore_index, chunk_size) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (rows, hidden) and weight (vocab, hidden) with the same hidden "
            f"size, got hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden and weight must share one floating dtype, got {hidden.dtype} and "
            f"{weight.dtype}"
        )
    if labels.dtype != torch.int64 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"labels must be int64 of shape ({hidden.shape[0]},), got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    if bias is not None and (
        not isinstance(bias, torch.Tensor)
        or bias.shape != weight.shape[:1]
        or bias.dtype != weight.dtype
    ):
        raise ValueError(
            f"bias must be None or a {weight.dtype} tensor of shape ({weight.shape[0]},), got "
            f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk):
        keep = (labels != ignore_index).nonzero().squeeze(1)
        n = keep.numel()
        vocab = weight.shape[0]
        if n and (int(labels[keep].min()) < 0 or int(labels[keep].max()) >= vocab):
            raise ValueError(
                f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, got "
                f"min {int(labels[keep].min())} max {int(labels[keep].max())}"
            )
        wide = torch.float32
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        # float32 accumulation over chunks; the weights' own dtype when that is float32
        grad_w = torch.zeros(weight.shape, dtype=wide) if need_w else None
        grad_b = torch.zeros(vocab, dtype=wide) if need_b else None
        total = torch.zeros((), dtype=wide)
        step = chunk or max(1, CHUNK_BYTES // (4 * vocab))
        for s in range(0, n, step):
            whole = n == hidden.shape[0] and step >= n  # every row, one chunk: no gather
            rows = None if whole else keep[s : s + step]
            h = hidden if rows is None else hidden.index_select(0, rows)
            y = labels if rows is None else labels.index_select(0, rows)
            logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
            # one fused pass for the log-softmax (logsumexp + subtract took 3 passes and
            # twice the time on 2 cores), one for its exp: softmax, the logits' gradient
            lp = torch.log_softmax(logits.to(wide), 1)
            total -= lp.gather(1, y[:, None]).sum()
            g = lp.exp_()
            g[torch.arange(g.shape[0]), y] -= 1.0
            gd = g.to(hidden.dtype)
            # 1/n (the mean) is applied to the small products, not to the (rows, vocab) block
            if need_h:
                gh = torch.mm(gd, weight).mul_(1.0 / n)
                if rows is None:
                    grad_h.copy_(gh)
                else:
                    grad_h.index_copy_(0, rows, gh)
            if need_w:
                if gd.dtype == wide:
                    grad_w.addmm_(gd.T, h, alpha=1.0 / n)
                else:
                    grad_w.addmm_(gd.T.to(wide), h.to(wide), alpha=1.0 / n)
            if need_b:
                grad_b.add_(g.sum(0), alpha=1.0 / n)
        loss = total / n if n else torch.full((), float("nan"))
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(weight.dtype),
        )
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = None if bool(grad_out == 1) else grad_out

        def scaled(g):
            return None if g is None or scale is None else g * scale.to(g.dtype)

        return (
            grad_h if scale is None else scaled(grad_h),
            grad_w if scale is None else scaled(grad_w),
            grad_b if scale is None else scaled(grad_b),
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, on the CPU.

    Rows whose label is ``ignore_index`` cost nothing; the gradients are computed in the
    forward, ``chunk_size`` rows at a time, so no ``(rows, vocab)`` tensor is kept for the
    backward. All rows ignored gives NaN, as ``F.cross_entropy`` does.

    Args:
        hidden: ``(rows, hidden)`` floating point.
        weight: ``(vocab, hidden)``, the same dtype.
        labels: ``(rows,)`` int64, each in ``[0, vocab)`` or ``ignore_index``.
        bias: ``None`` or ``(vocab,)``.
        ignore_index: the label of rows without a loss.
        chunk_size: rows per chunk (``None``: about 4 MiB of float32 logits).

    Returns:
        The float32 scalar loss (differentiable in ``hidden``, ``weight`` and ``bias``).

    Example:
        >>> import torch
        >>> h, w = torch.randn(6, 4, requires_grad=True), torch.randn(10, 4)
        >>> loss = linear_cross_entropy(h, w, torch.tensor([1, -100, 3, 9, -100, 0]))
        >>> loss.backward()
    """
    _check(hidden, weight, labels, bias, ignore_index, chunk_size)
    if hidden.device.type != "cpu":
        raise ValueError(f"hidden must be on the CPU for this implementation, got {hidden.device}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, chunk_size)
