"""Fused linear + cross-entropy for the LM head: the ``(N, V)`` logits are never built.

``linear_cross_entropy(hidden, weight, labels)`` equals ``F.cross_entropy(F.linear(hidden,
weight, bias), labels, ignore_index=...)`` (mean over the rows that are not ignored). Rows are
processed in chunks of ``chunk_size``; for each chunk:

1. ``logits = hidden_c @ weight.T (+ bias)`` (cuBLAS), a ``(chunk, V)`` buffer;
2. one Triton program per row computes the row's log-sum-exp online over V tiles and its
   loss, and, when a gradient is wanted, overwrites the row with ``d loss / d logits =
   (softmax - onehot(label)) / n_valid`` (zeros for ignored rows);
3. ``grad_hidden_c = dlogits @ weight`` and ``grad_weight += dlogits.T @ hidden_c`` (cuBLAS;
   ``grad_weight`` accumulated in float32), ``grad_bias += dlogits.sum(0)``.

The gradients are computed in the forward pass (the loss is a graph's last node, so the
incoming gradient is a scalar) and backward only scales them by it: three matmuls of the
LM head's size in all, as in eager PyTorch, with a ``(chunk, V)`` buffer instead of
eager's ``(N, V)`` logits, their float32 softmax and their gradient. When no gradient is
wanted (``torch.no_grad`` or inputs that do not require one) only the loss is computed.

Labels: ``ignore_index`` rows count for nothing; when every row is ignored the loss is
0/0 = NaN and every gradient is zero, as in PyTorch. An eager call checks that the other
labels lie in ``[0, V)`` (one host sync) and raises ``ValueError`` naming ``labels``; under
``torch.compile`` or CUDA-graph capture (no sync) a row with such a label gets a NaN loss
instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ryzen_opt.kernels import reference
from ryzen_opt.kernels.triton._launcher import CachedLauncher
from ryzen_opt.kernels.triton.training import _common

# fmt: off
# Kernel signatures and launches keep their arguments grouped by role (pointers, sizes,
# strides, meta-parameters) on shared lines, as STYLE.md asks.

# A whole Llama vocabulary row (32000 -> 32768) in one tile: 32 fp32 values per thread at 32
# warps. The interpreter takes 128 so the tests cross several tiles on small vocabularies.
_MAX_BLOCK_V = 128 if _common.INTERPRET else 32768

# Default chunk: 2**25 logits (64 MiB in bf16; 1024 rows of a 32000-word vocabulary). Four
# times less than eager's bf16 logits at 4096 tokens, and a chunk's GEMMs stay large enough
# (1024 x 32000 x 2048) to run at cuBLAS's full rate.
_CHUNK_LOGITS = 1 << 25


@triton.jit
def _ce_kernel(
    # pointers
    logits_ptr, labels_ptr, loss_ptr, n_valid_ptr,
    # sizes
    V, ignore_index,
    # strides
    stride_l,
    # meta-parameters
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_l
    cols = tl.arange(0, BLOCK_V)
    # Online log-sum-exp over the V tiles; the first tile (V >= 1) starts the running max.
    x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, 0)
    s = tl.sum(tl.exp(x - m), 0)
    for start in range(BLOCK_V, V, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf"))
        x = x.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)

    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)
    x_label = tl.load(base + label, mask=valid & in_range, other=0.0).to(tl.float32)
    loss = tl.where(valid, tl.where(in_range, lse - x_label, float("nan")), 0.0)
    tl.store(loss_ptr + row, loss)

    if WRITE_GRAD:
        # Mean over the valid rows of the whole batch, not of this chunk. (With no valid row
        # no row takes the scale; the max keeps 1/0 out of the unused branch.)
        scale = tl.where(valid, 1.0 / tl.maximum(tl.load(n_valid_ptr), 1.0), 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(base + offs, mask=offs < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse)
            g = tl.where(offs == label, g - 1.0, g) * scale
            tl.store(base + offs, g.to(logits_ptr.dtype.element_ty), mask=offs < V)


_launch_ce = CachedLauncher(_ce_kernel, loose="ints")


def default_chunk_size(n_rows: int, vocab: int) -> int:
    """Rows per chunk when ``chunk_size`` is ``None``: the largest power of two whose
    ``(rows, vocab)`` logits fit in 2**25 values (at least 1), capped at ``n_rows``."""
    per = max(1, _CHUNK_LOGITS // max(vocab, 1))
    return max(1, min(max(n_rows, 1), 1 << (per.bit_length() - 1)))


_FP32_ADDMM: dict[str, bool] = {}


def _accumulate(acc32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc32 += a @ b`` in float32 for 16-bit ``a``, ``b``.

    On CUDA cuBLAS adds into the float32 accumulator in its epilogue (``addmm`` with
    ``out_dtype``); where that overload is missing (CPU, older torch) the 16-bit product is
    added, which rounds each chunk's product once to 16 bits before the float32 sum.
    """
    if a.dtype == torch.float32:
        acc32.addmm_(a, b)
        return
    key = a.device.type
    if _FP32_ADDMM.get(key, key == "cuda"):
        try:
            torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)
            _FP32_ADDMM[key] = True
            return
        except (RuntimeError, TypeError):
            _FP32_ADDMM[key] = False
    acc32.add_(a @ b)


def _forward(hidden, weight, labels, bias, ignore_index, chunk_size, want_h, want_w, want_b):
    h_dim, vocab = hidden.shape[-1], weight.shape[0]
    h2 = hidden.reshape(-1, h_dim)
    lab = labels.reshape(-1).contiguous()
    n = h2.shape[0]
    dev = hidden.device
    f32 = {"device": dev, "dtype": torch.float32}
    write_grad = want_h or want_w or want_b
    gh = torch.empty(hidden.shape if want_h else (0,), device=dev, dtype=hidden.dtype)
    gw32 = torch.zeros((vocab, h_dim) if want_w else (0,), **f32)
    gb32 = torch.zeros((vocab,) if want_b else (0,), **f32)
    row_loss = torch.empty((n,), **f32)
    n_valid = (lab != ignore_index).sum().to(torch.float32)  # on the device: no sync
    if n > 0:
        gh2 = gh.view(n, h_dim) if want_h else gh
        wt = weight.t()
        block_v = min(_MAX_BLOCK_V, _common.next_pow2(vocab))
        warps = min(32, max(4, block_v // 1024))
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            hc = h2[start:end]
            logits = torch.addmm(bias, hc, wt) if bias is not None else hc @ wt
            _launch_ce(
                (end - start,),
                logits, lab[start:end], row_loss[start:end], n_valid,
                vocab, int(ignore_index),
                logits.stride(0),
                WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=warps,
            )
            if want_h:
                torch.mm(logits, weight, out=gh2[start:end])
            if want_w:
                _accumulate(gw32, logits.t(), hc)
            if want_b:
                gb32 += logits.sum(0, dtype=torch.float32)
    loss = (row_loss.sum() / n_valid).to(hidden.dtype)
    gw = gw32.to(weight.dtype)
    gb = gb32.to(bias.dtype) if bias is not None else gb32
    return loss, gh, gw, gb


def _lce_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    chunk_size: int,
    want_h: bool,
    want_w: bool,
    want_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(hidden, weight, labels, bias, ignore_index, chunk_size, want_h, want_w,
                    want_b)


_lce_op = torch.library.custom_op(
    "ryzen_opt::train_linear_cross_entropy", mutates_args=()
)(_lce_impl)


@_lce_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, chunk_size, want_h, want_w, want_b):
    bdt = bias.dtype if bias is not None else torch.float32
    return (
        hidden.new_empty(()),
        hidden.new_empty(hidden.shape if want_h else (0,)),
        weight.new_empty(weight.shape if want_w else (0,)),
        hidden.new_empty((weight.shape[0],) if want_b else (0,), dtype=bdt),
    )


def _setup_context(ctx, inputs, output):
    _, gh, gw, gb = output
    ctx.wants = inputs[6:9]
    ctx.save_for_backward(gh, gw, gb)


def _backward(ctx, dloss, *_):
    gh, gw, gb = ctx.saved_tensors
    want_h, want_w, want_b = ctx.wants
    # Out of place: a second backward through the same graph (retain_graph) scales again
    # from the stored gradients.
    return (
        gh * dloss if want_h else None,
        gw * dloss if want_w else None,
        None,
        gb * dloss if want_b else None,
        None, None, None, None, None,
    )


_lce = _common.TrainingOp(_lce_op, _lce_impl, _setup_context, _backward)


def supports(hidden, weight, labels, bias=None, *, ignore_index=-100, chunk_size=None):
    """``None`` if the Triton linear_cross_entropy can serve this call, else the reason."""
    return _common.reason("linear_cross_entropy", hidden=hidden, weight=weight, labels=labels,
                          bias=bias)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` without the full logits.

    Matches ``F.cross_entropy(F.linear(hidden, weight, bias), labels,
    ignore_index=ignore_index)`` (see :func:`reference.linear_cross_entropy`), forward and
    backward.

    Args:
        hidden: ``(..., H)`` float16/bfloat16/float32, any strides.
        weight: ``(V, H)`` in ``hidden``'s dtype (an ``nn.Linear``/tied embedding weight).
        labels: int64 or int32 of ``hidden``'s leading shape; values in ``[0, V)`` or
            ``ignore_index``.
        bias: ``None`` or ``(V,)`` in ``hidden``'s dtype.
        ignore_index: label of rows that do not count.
        chunk_size: rows per chunk (default: about 2**25 logits per chunk). Peak extra memory
            is one ``(chunk_size, V)`` buffer in ``hidden``'s dtype.

    Returns:
        The scalar loss in ``hidden``'s dtype (NaN when every row is ignored, as PyTorch);
        differentiable in ``hidden``, ``weight`` and ``bias`` (the weight gradient is
        accumulated over chunks in float32).

    Example:
        >>> loss = linear_cross_entropy(h[:, :-1], lm_head.weight, ids[:, 1:])  # doctest: +SKIP
    """
    reference.check_linear_cross_entropy_args(hidden, weight, labels, bias, ignore_index,
                                              chunk_size)
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels), ("bias", bias)):
        _common.check_device(name, t)
    _common.check_dtype("hidden", hidden)
    vocab = weight.shape[0]
    # The label check reads a value back to the host: not while compiling (dynamo traces no
    # capture query either) or capturing a CUDA graph.
    tracing = torch.compiler.is_compiling()
    capturing = not tracing and labels.is_cuda and torch.cuda.is_current_stream_capturing()
    if not tracing and not capturing and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(
                f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                f"found {labels[bad][0].item()}"
            )
    n = labels.numel()
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(n, vocab)
    grad = torch.is_grad_enabled()
    loss, _, _, _ = _lce(
        hidden, weight, labels, bias, int(ignore_index), chunk,
        grad and hidden.requires_grad, grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    )
    return loss
