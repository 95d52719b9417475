"""Pure-PyTorch reference of every ryzen_opt op, with the public signatures.

These are the ground truth: tests compare every backend against them (computed in float64),
benchmarks use them as the "untouched PyTorch" column, and ``backend="auto"`` falls back to
them. They favour clarity over speed, but stay on the PyTorch fast paths (``addmm``, SDPA)
where the semantics match exactly.

Conventions shared by all backends:

* ``matmul(a, b)`` follows ``torch.matmul`` for 2-D and batched 3-D inputs.
* Attention takes ``(batch, heads, seq, head_dim)`` like ``scaled_dot_product_attention``.
  Grouped-query attention: ``k``/``v`` may have fewer heads than ``q`` as long as they divide
  it; query head ``h`` reads kv head ``h // (q_heads // kv_heads)``.
* ``causal=True`` with ``q_len != k_len`` is aligned to the bottom right (as in
  FlashAttention): query ``i`` sees keys ``j <= i + (k_len - q_len)``. That is what a query
  chunk appended after a KV cache needs. (``torch``'s ``is_causal`` aligns top-left; the two
  agree when ``q_len == k_len``.) A query row that sees no key at all outputs zeros.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")

# DESIGN.md rule 2: the relative error ||out - ref|| / ||ref|| a kernel may show against this
# reference and still replace it (fp32 for kernels that reorder sums; bf16/fp16 inputs).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def error_floor(
    dtype: torch.dtype, tol: float, numel: int, reduction: int = 1, magnitude: float = 1.0
) -> float:
    """The norm below which :func:`relative_error` stops dividing by ``||ref||``.

    ``||out - ref|| / ||ref||`` has no scale when the reference cancels to (near) zero: one
    output of a 27-term dot product through GELU-tanh was -8.7e-8 in float64 and -0.0 from a
    correct fp32 kernel, a "relative error" of 1. A correct kernel's error scales with its
    *inputs*, not with the result: a sequential fp32 sum of ``k`` terms of size ``magnitude``
    carries about ``0.2 * eps * k * magnitude`` of rounding error per output (k roundings,
    each ~eps times a partial sum that grows like sqrt(j) * magnitude, adding up as a random
    walk). Five times that, ``atol = eps * k * magnitude * sqrt(numel)`` in norm over
    ``numel`` outputs, plays the part of ``torch.testing``'s atol next to its rtol; the floor
    is ``atol / tol``, so an error of ``atol`` on a cancelled reference passes at ``tol``.
    Measured: torch's own fp32 matmul + GELU/SiLU on single outputs (k < 300, 2000 cases)
    failed the plain ratio at 1e-5 in 11% of cases and this one in none (worst 4.4e-6).

    The floor never loosens ordinary tensors. Their norm is the ``natural`` norm
    ``magnitude * sqrt(k * numel)`` (independent terms), and ``atol / tol`` is
    ``eps * sqrt(k) / tol`` of it: fp32 (eps 1.19e-7) at the strict tol 1e-5 gives 0.012 at
    k=1, 0.062 at k=27, 0.21 at k=300; at 1e-4 ten times less. It is capped at half the
    natural norm (reached at k >= 1760 for tol 1e-5) so that a large reduction can never make
    the floor exceed an ordinary result's norm. ``eps`` is the accumulation dtype's: every
    kernel accumulates 16-bit inputs in fp32, and the 16-bit rounding of the output is
    relative to the output itself (no floor needed).

    Args:
        dtype: the dtype the kernel computed in (not the float64 reference's).
        tol: the tolerance the error will be compared with.
        numel: number of output elements.
        reduction: length of the sum behind each output (``K`` of a matmul; 1 for
            element-wise ops, attention outputs and norms, whose outputs are averages).
        magnitude: typical size of one term of that sum (1 for products of unit normals).

    Returns:
        The floor, in the units of ``||ref||``.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    k, n = max(int(reduction), 1), max(int(numel), 0)
    natural = magnitude * math.sqrt(k * n)
    return min(eps * k * magnitude * math.sqrt(n) / tol, 0.5 * natural)


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """``||out - ref|| / max(||ref||, floor)`` in float64 (see :func:`error_floor`).

    NaN in ``out`` where ``ref`` is finite gives ``inf``; matching non-finite values (NaN
    with NaN, inf with inf of one sign) count as equal, as in ``torch.testing``.

    Args:
        out: the kernel's result.
        ref: the reference, same shape.
        floor: the norm below which ``||ref||`` is not used as the scale.

    Returns:
        The relative error (0.0 for two empty tensors).
    """
    if out.shape != ref.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != ref shape {tuple(ref.shape)}")
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    same = (o == r) | (torch.isnan(o) & torch.isnan(r))
    if not bool(same[~(torch.isfinite(o) & torch.isfinite(r))].all()):
        return math.inf
    finite = torch.isfinite(r)
    diff = torch.where(finite, o - r, 0.0)
    num = float(diff.norm())
    den = max(float(torch.where(finite, r, 0.0).norm()), float(floor))
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else math.inf


def apply_activation(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    """Apply a named epilogue activation (``None`` is the identity).

    This is torch's own, so at ``x = -inf`` GELU and SiLU give NaN (``-inf * 0``) and fp32
    ``gelu(+inf)`` is NaN; the numba and triton epilogues return the limits (-0.0 and +inf).
    Finite inputs agree."""
    if activation is None:
        return x
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "silu":
        return F.silu(x)
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def matmul_out_shape(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    """The shape ``torch.matmul(a, b)`` returns for 2-D/3-D ``a``, ``b`` that passed
    :func:`check_matmul_args`: a batch of 1 broadcasts against any batch, 0 included
    (``(0, M, K) @ (K, N)`` is ``(0, M, N)``). Plain Python: the meta-tensor product costs
    ~30 us of host time per call."""
    m, n = a.shape[-2], b.shape[-1]
    if a.dim() == 2 and b.dim() == 2:
        return (m, n)
    ba = a.shape[0] if a.dim() == 3 else 1
    bb = b.shape[0] if b.dim() == 3 else 1
    return (bb if ba == 1 else ba, m, n)


def check_scale(scale: object) -> None:
    """``scale`` must be ``None`` or a finite real number (0 and negatives are well defined:
    uniform and reversed weights, as SDPA allows); NaN or inf would make every score NaN."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be None or a real number, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}")


def check_out_dtype(out_dtype: object) -> None:
    """``out_dtype`` must be ``None`` or a floating ``torch.dtype`` (names such as
    ``"float16"`` are refused, as by ``torch.Tensor.to``: one spelling, no guessing)."""
    if out_dtype is None:
        return
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(
            f"out_dtype must be None or a torch.dtype such as torch.float16, got {out_dtype!r}"
        )
    if not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating-point dtype, got {out_dtype}")


def check_matmul_args(a, b, bias=None, activation=None, residual=None, out_dtype=None) -> None:
    """Validate ``matmul`` arguments; raise naming the offending argument."""
    _check_tensor("a", a)
    _check_tensor("b", b)
    if a.dim() not in (2, 3) or b.dim() not in (2, 3):
        raise ValueError(
            f"a and b must be 2-D or batched 3-D, got a.dim()={a.dim()}, b.dim()={b.dim()}"
        )
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"a's last dim ({a.shape[-1]}) must equal b's second-to-last dim ({b.shape[-2]}); "
            f"got a{tuple(a.shape)} @ b{tuple(b.shape)}"
        )
    if (
        a.dim() == 3
        and b.dim() == 3
        and a.shape[0] != b.shape[0]
        and 1
        not in (
            a.shape[0],
            b.shape[0],
        )
    ):
        raise ValueError(f"batch sizes differ: a{tuple(a.shape)} vs b{tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype, got a={a.dtype}, b={b.dtype}")
    if not a.is_floating_point():
        raise TypeError(f"a must be a floating-point tensor, got {a.dtype}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got a={a.device}, b={b.device}")
    n = b.shape[-1]
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if bias.device != a.device:
            raise ValueError(f"bias must be on {a.device}, got {bias.device}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    check_out_dtype(out_dtype)
    if residual is not None:
        _check_tensor("residual", residual)
        out_shape = matmul_out_shape(a, b)
        if tuple(residual.shape) != tuple(out_shape):
            raise ValueError(
                f"residual must have the output's shape {tuple(out_shape)}, "
                f"got {tuple(residual.shape)}"
            )
        if residual.device != a.device:
            raise ValueError(f"residual must be on {a.device}, got {residual.device}")


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``activation(a @ b + bias) + residual``, cast to ``out_dtype``.

    Args:
        a: ``(M, K)`` or ``(B, M, K)``.
        b: ``(K, N)`` or ``(B, K, N)``.
        bias: optional ``(N,)``, added before the activation.
        activation: ``None``, ``"gelu"`` (erf), ``"gelu_tanh"``, ``"silu"`` or ``"relu"``.
        residual: optional tensor of the output's shape, added after the activation.
        out_dtype: output dtype, a floating ``torch.dtype`` (default: ``a.dtype``); a name
            such as ``"float16"`` raises ``TypeError``.

    Returns:
        The ``(M, N)`` or ``(B, M, N)`` result; a batch of 1 broadcasts against any batch,
        an empty one included.
    """
    check_matmul_args(a, b, bias, activation, residual, out_dtype)
    if a.dim() == 2 and b.dim() == 2 and bias is not None:
        y = torch.addmm(bias.to(a.dtype), a, b)
    else:
        y = torch.matmul(a, b)
        if bias is not None:
            y = y + bias.to(y.dtype)
    y = apply_activation(y, activation)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return y.to(out_dtype) if out_dtype is not None else y


def check_attention_args(q, k, v, attn_mask=None, scale=None) -> None:
    """Validate attention arguments; raise naming the offending argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head_dim differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"k's heads ({k.shape[1]}) must divide q's heads ({q.shape[1]}) (grouped-query)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    check_scale(scale)
    if attn_mask is not None:
        _check_tensor("attn_mask", attn_mask)
        # As SDPA: True = keep, or an additive float mask. An integer 0/1 mask is ambiguous
        # (added as 0/1 it masks nothing), so it is refused rather than guessed.
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(
                f"attn_mask must be bool (True = keep) or floating point (added to the "
                f"scores), got {attn_mask.dtype}; use attn_mask.bool() for a 0/1 mask"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask must be on {q.device}, got {attn_mask.device}")
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            torch.broadcast_shapes(attn_mask.shape, target)
        except RuntimeError:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}"
            ) from None


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Bottom-right aligned boolean mask, ``True`` where query ``i`` may see key ``j``."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + (k_len - q_len)


def expand_kv_heads(t: torch.Tensor, q_heads: int) -> torch.Tensor:
    """Repeat grouped kv heads so there is one per query head."""
    groups = q_heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention in SDPA layout (see module docstring for causal alignment and GQA).

    Args:
        q: ``(B, Hq, Lq, D)``.
        k, v: ``(B, Hkv, Lk, D)`` with ``Hkv`` dividing ``Hq``.
        causal: bottom-right aligned causal masking.
        scale: softmax scale, a finite real number (default ``1/sqrt(D)``).
        attn_mask: optional boolean (``True`` = keep) or additive float mask broadcastable to
            ``(B, Hq, Lq, Lk)``; integer masks raise ``TypeError``, as in SDPA.

    Returns:
        ``(B, Hq, Lq, D)`` in ``q.dtype``.
    """
    check_attention_args(q, k, v, attn_mask, scale)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    k = expand_kv_heads(k, q.shape[1])
    v = expand_kv_heads(v, q.shape[1])
    lq, lk = q.shape[2], k.shape[2]
    if lq == 0 or lk == 0:
        return q.new_zeros(q.shape[:3] + (v.shape[-1],))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if causal:
        scores = scores.masked_fill(~causal_mask(lq, lk, q.device), float("-inf"))
    # Softmax in at least fp32 (bf16/fp16 inputs), in float64 for a float64 reference.
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    # Rows that see no key are all -inf: softmax gives NaN; define their output as zero.
    probs = torch.nan_to_num(probs, nan=0.0).to(q.dtype)
    return torch.matmul(probs, v)


def check_decode_args(q, k_cache, v_cache, cache_lengths, scale=None) -> None:
    """Validate ``decode_attention`` arguments; raise naming the offending argument."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t)
    _check_tensor("cache_lengths", cache_lengths)
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, heads, head_dim), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be (batch, kv_heads, max_len, head_dim), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    b, hq, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} in batch/head_dim"
        )
    if k_cache.shape[1] == 0 or hq % k_cache.shape[1] != 0:
        raise ValueError(f"k_cache's heads ({k_cache.shape[1]}) must divide q's heads ({hq})")
    check_scale(scale)
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(
            f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, "
            f"{v_cache.dtype}"
        )
    if cache_lengths.shape != (b,) or cache_lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cache_lengths must be an int32/int64 tensor of shape ({b},), got "
            f"{cache_lengths.dtype} {tuple(cache_lengths.shape)}"
        )
    # The value check reads the tensor on the host: on CUDA that is a sync per decode step
    # (~0.13 ms on an H100), so it runs for CPU tensors only; GPU kernels clamp the lengths.
    if (
        b
        and cache_lengths.device.type == "cpu"
        and (int(cache_lengths.min()) < 0 or int(cache_lengths.max()) > k_cache.shape[2])
    ):
        raise ValueError(
            f"cache_lengths must lie in [0, {k_cache.shape[2]}] (the cache's max_len), got "
            f"min {int(cache_lengths.min())} max {int(cache_lengths.max())}"
        )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One query token per sequence against a KV cache with per-row valid lengths.

    Args:
        q: ``(B, Hq, D)``, the new token's queries.
        k_cache, v_cache: ``(B, Hkv, max_len, D)``; row ``b`` is valid up to
            ``cache_lengths[b]`` (the new token's own k/v already appended).
        cache_lengths: ``(B,)`` int tensor. Slots past a row's length are never read into
            the result (they may hold anything, NaN included).
        scale: softmax scale, a finite real number (default ``1/sqrt(D)``).

    Returns:
        ``(B, Hq, D)``; rows with length 0 are zeros.
    """
    check_decode_args(q, k_cache, v_cache, cache_lengths, scale)
    max_len = k_cache.shape[2]
    valid = torch.arange(max_len, device=q.device)[None, :] < cache_lengths.to(q.device)[:, None]
    # Slots past a row's length must not matter. Their scores are replaced by -inf (NaN
    # keys included), but probability 0 times a NaN left in an unused V slot (torch.empty,
    # or NaN-filled under deterministic mode) is still NaN, so V's unused slots are zeroed.
    v_cache = v_cache.masked_fill(~valid[:, None, :, None], 0.0)
    attn_mask = valid[:, None, None, :]  # (B, 1, 1, max_len)
    return attention(q[:, :, None, :], k_cache, v_cache, scale=scale, attn_mask=attn_mask)[:, :, 0]


def check_layer_norm_args(x, weight, bias, residual, eps=1e-5) -> None:
    """Validate ``layer_norm`` arguments; raise naming the offending argument."""
    _check_tensor("x", x)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    # eps = 0 is exact LayerNorm (torch allows it); a negative or NaN eps makes the variance
    # term negative or NaN and every output NaN.
    if not (math.isfinite(float(eps)) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor of at least 1 dim, got {x.dtype} {x.dim()}")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_tensor(name, t)
            if t.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if residual is not None:
        _check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim, optionally fused with a residual add.

    Returns ``layer_norm(x)`` when ``residual`` is ``None``; otherwise ``(layer_norm(h), h)``
    with ``h = x + residual`` (the pre-LN block needs ``h`` for its next residual). ``eps``
    must be a finite real number >= 0.
    """
    check_layer_norm_args(x, weight, bias, residual, eps)
    h = x if residual is None else x + residual
    out = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return out if residual is None else (out, h)


def check_lora_args(x, a, b, scales, indices, out=None, check_range=True) -> None:
    """Validate ``lora_bgmv`` arguments; raise naming the offending argument.

    The range check of ``indices`` reads their values, so it runs for CPU ``indices`` only
    (on CUDA it would be a host sync per call; see the Triton backend for what its kernel
    does with an index out of range), and only with ``check_range`` (a backend that reads
    the indices anyway checks them itself).
    """
    for name, t in (("x", x), ("a", a), ("b", b), ("scales", scales), ("indices", indices)):
        _check_tensor(name, t)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows, in_features), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    rows, in_features = x.shape
    if a.dim() != 3 or a.shape[2] != in_features:
        raise ValueError(
            f"a must be (n_adapters, rank, in_features={in_features}) (lora_A weights "
            f"stacked), got shape {tuple(a.shape)}"
        )
    n_adapters, rank = a.shape[0], a.shape[1]
    if b.dim() != 3 or b.shape[0] != n_adapters or b.shape[2] != rank:
        raise ValueError(
            f"b must be (n_adapters={n_adapters}, out_features, rank={rank}) (lora_B weights "
            f"stacked), got shape {tuple(b.shape)}"
        )
    if scales.shape != (n_adapters,) or not scales.is_floating_point():
        raise ValueError(
            f"scales must be a floating tensor of shape ({n_adapters},), got "
            f"{scales.dtype} {tuple(scales.shape)}"
        )
    if indices.shape != (rows,) or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"indices must be an int64 (or int32) tensor of shape ({rows},), got "
            f"{indices.dtype} {tuple(indices.shape)}"
        )
    if not (x.dtype == a.dtype == b.dtype):
        raise TypeError(f"x, a, b must share a dtype, got {x.dtype}, {a.dtype}, {b.dtype}")
    for name, t in (("a", a), ("b", b), ("scales", scales), ("indices", indices)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if out is not None:
        _check_tensor("out", out)
        if tuple(out.shape) != (rows, b.shape[1]):
            raise ValueError(
                f"out must have shape ({rows}, {b.shape[1]}) (rows, out_features), got "
                f"{tuple(out.shape)}"
            )
        if out.dtype != x.dtype:
            raise TypeError(f"out must have x's dtype {x.dtype}, got {out.dtype}")
        if out.device != x.device:
            raise ValueError(f"out must be on x's device {x.device}, got {out.device}")
    if check_range and rows and indices.device.type == "cpu":
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= n_adapters:
            raise ValueError(
                f"indices must lie in [-1, {n_adapters - 1}] (-1 = no adapter; a holds "
                f"{n_adapters} adapters), got min {lo} max {hi}"
            )


def lora_bgmv(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mixed-batch LoRA delta (BGMV): row ``r`` uses adapter ``indices[r]``, or none for -1.

    ``delta[r] = scales[i] * b[i] @ (a[i] @ x[r])`` with ``i = indices[r] >= 0``, zeros where
    ``indices[r] == -1``. Computed as PEFT computes a mixed batch: one pair of matmuls per
    adapter present, over the rows that use it.

    Args:
        x: ``(rows, in_features)``; decode tokens or flattened prefill tokens.
        a: ``(n_adapters, rank, in_features)``, PEFT's ``lora_A`` weights stacked.
        b: ``(n_adapters, out_features, rank)``, PEFT's ``lora_B`` weights stacked.
        scales: ``(n_adapters,)`` floating, each adapter's ``alpha / rank``.
        indices: ``(rows,)`` int64 (or int32), values in ``[-1, n_adapters)``; this
            reference checks the range on any device (it reads the indices anyway).
        out: optional ``(rows, out_features)`` tensor of ``x``'s dtype (the base layer's
            output): the delta is added into it in place and ``out`` is returned.

    Returns:
        The ``(rows, out_features)`` delta in ``x.dtype``, or ``out`` with the delta added.
    """
    check_lora_args(x, a, b, scales, indices, out)
    n_adapters = a.shape[0]
    idx = indices.to(device=x.device, dtype=torch.int64)
    if idx.device.type != "cpu" and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= n_adapters:
            raise ValueError(
                f"indices must lie in [-1, {n_adapters - 1}] (-1 = no adapter), "
                f"got min {lo} max {hi}"
            )
    delta = x.new_zeros((x.shape[0], b.shape[1]))
    for i in torch.unique(idx).tolist():
        if i < 0:
            continue
        rows = (idx == i).nonzero().squeeze(1)
        t = x.index_select(0, rows) @ a[i].t()
        delta.index_copy_(0, rows, (t @ b[i].t()) * scales[i].to(x.dtype))
    return delta if out is None else out.add_(delta)


# Training ops (forward + backward through autograd). The Triton versions live in
# ryzen_opt/kernels/triton/training/, one module per op, with these signatures.

GELU_APPROXIMATIONS = ("none", "tanh")


def _check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def check_linear_cross_entropy_args(
    hidden, weight, labels, bias=None, ignore_index=-100, chunk_size=None
) -> None:
    """Validate ``linear_cross_entropy`` arguments; raise naming the offending argument."""
    _check_tensor("hidden", hidden)
    _check_tensor("weight", weight)
    _check_tensor("labels", labels)
    if hidden.dim() < 1 or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating tensor (..., H), got {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, {hidden.shape[-1]}) (hidden's last dim), "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    _check_same("weight", weight, "hidden", hidden)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != hidden.device:
        raise ValueError(f"labels must be on hidden's device {hidden.device}, got {labels.device}")
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        _check_same("bias", bias, "hidden", hidden)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, numbers.Integral)
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``.

    ``F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=ignore_index)``
    over the rows of ``hidden`` (``(..., H)``, labels ``(...)``). Rows whose label is
    ``ignore_index`` do not count; when every row is ignored the mean is 0/0 = NaN and every
    gradient is zero, as in PyTorch. ``chunk_size`` is accepted for the signature of the fused
    op and ignored here (the full logits are built).
    """
    check_linear_cross_entropy_args(hidden, weight, labels, bias, ignore_index, chunk_size)
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    return F.cross_entropy(logits, labels.reshape(-1).long(), ignore_index=ignore_index)


def check_norm_residual_args(x, residual, weight, bias=None, eps=1e-6) -> None:
    """Validate ``rms_norm_residual`` / ``layer_norm_residual`` arguments."""
    check_layer_norm_args(x, weight, bias, residual, eps)
    if residual is not None:
        _check_same("residual", residual, "x", x)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
            if t.device != x.device:
                raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``h = x + residual`` (``h = x`` when ``residual`` is ``None``).

    Returns ``(y, h)`` with ``y = h / sqrt(mean(h**2) + eps) * weight`` computed in at least
    float32 and returned in ``x``'s dtype (``h`` is rounded to ``x``'s dtype first, as the
    unfused ``x + residual`` is).
    """
    check_norm_residual_args(x, residual, weight, None, eps)
    h = x if residual is None else x + residual
    hf = h.to(torch.promote_types(h.dtype, torch.float32))
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(hf.dtype)
    return y.to(x.dtype), h


def layer_norm_residual(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of ``h = x + residual`` (``h = x`` when ``residual`` is ``None``).

    Returns ``(y, h)``; ``y`` is ``F.layer_norm(h)`` computed in at least float32 and returned
    in ``x``'s dtype.
    """
    check_norm_residual_args(x, residual, weight, bias, eps)
    h = x if residual is None else x + residual
    ct = torch.promote_types(h.dtype, torch.float32)
    w = None if weight is None else weight.to(ct)
    b = None if bias is None else bias.to(ct)
    y = F.layer_norm(h.to(ct), (h.shape[-1],), w, b, eps)
    return y.to(x.dtype), h


def check_swiglu_args(gate, up) -> None:
    """Validate ``swiglu`` arguments; raise naming the offending argument."""
    _check_tensor("gate", gate)
    _check_tensor("up", up)
    if not gate.is_floating_point():
        raise TypeError(f"gate must be a floating tensor, got {gate.dtype}")
    if up.shape != gate.shape:
        raise ValueError(f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    _check_same("up", up, "gate", gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the gated MLP activation of Llama/Qwen2."""
    check_swiglu_args(gate, up)
    return F.silu(gate) * up


def check_gelu_args(x, approximate="none") -> None:
    """Validate ``gelu`` arguments; raise naming the offending argument."""
    _check_tensor("x", x)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x, approximate=approximate)`` (``"none"``: erf; ``"tanh"``: GPT-2's)."""
    check_gelu_args(x, approximate)
    return F.gelu(x, approximate=approximate)


def check_rotary_args(q, k, cos, sin) -> None:
    """Validate ``rotary`` arguments; raise naming the offending argument."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_tensor(name, t)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, heads, seq, head_dim), got {tuple(q.shape)}")
    b, _, s, d = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[2:] != (s, d):
        raise ValueError(
            f"k must be (batch={b}, heads, seq={s}, head_dim={d}), got {tuple(k.shape)}"
        )
    if d % 2:
        raise ValueError(f"q's head_dim must be even (rotate_half), got {d}")
    _check_same("k", k, "q", q)
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1:] != (s, d):
            raise ValueError(
                f"{name} must be ({b} or 1, seq={s}, head_dim={d}), got {tuple(t.shape)}"
            )
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` over the last dim split in halves (HF Llama's convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding, HF Llama's ``apply_rotary_pos_emb``.

    ``q_rot = q * cos + rotate_half(q) * sin`` (and ``k`` alike) with ``cos``/``sin`` of shape
    ``(batch or 1, seq, head_dim)`` broadcast over heads; results in ``q``'s dtype.
    """
    check_rotary_args(q, k, cos, sin)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q_rot = q * c + rotate_half(q) * s
    k_rot = k * c + rotate_half(k) * s
    return q_rot.to(q.dtype), k_rot.to(k.dtype)


def greedy_tail(logits, eos_mask, step_no, block, finished, pad, eos, tokens, j, ids):
    """A greedy loop's per-token bookkeeping, in place (the contract of
    :func:`ryzen_opt.kernels.triton.greedy_tail.greedy_tail`, whose docstring gives the
    arguments): eos ids masked out of the argmax while ``step_no < block``, the argmax
    (``torch.argmax``: first maximum, NaN the maximum), ``pad`` for finished rows, the token
    into column ``j`` of ``tokens`` and into ``ids``, rows that emit an eos id finished."""
    blocked = eos_mask & (step_no < block)
    nxt = logits.masked_fill(blocked[None, :], float("-inf")).argmax(-1)
    nxt = torch.where(finished, pad.expand_as(nxt), nxt)
    tokens.index_copy_(1, j, nxt[:, None])
    finished |= torch.isin(nxt, eos)  # the -1 padding only matches a finished row's pad
    ids.copy_(nxt)
