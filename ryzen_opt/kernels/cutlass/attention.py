"""CUTLASS flash-attention forward on Hopper: CUTLASS's warp-specialized FMHA collectives.

``softmax(q k^T * scale) v`` in SDPA layout ``(batch, heads, seq, head_dim)`` with the
library's conventions (see :mod:`ryzen_opt.kernels.reference`): bottom-right aligned causal
masking, any softmax scale, grouped-query heads. The kernel is one producer warp group
streaming K and V tiles through TMA into a shared-memory pipeline and two consumer warp groups
of 64 query rows each running the QK^T and PV products on the tensor cores with the online
softmax between them (``csrc/attention_sm90.cuh``; the collectives are those CUTLASS ships
with its Hopper FMHA example, built from the installed package's headers, not copied).

Kernels are built ahead of time (``python -m ryzen_opt.kernels.cutlass``). Serves bfloat16
on sm_90 with head dim 64 or 128, query length a multiple of 8, 16-byte
aligned rows (TMA), the causal mask only where ``q_len <= k_len`` and no ``attn_mask``;
:func:`supports` names the reason otherwise, and the Triton backend serves the rest.
"""

from __future__ import annotations

import functools
import math

import torch

from ryzen_opt.kernels import reference, registry
from ryzen_opt.kernels.cutlass import _build
from ryzen_opt.kernels.cutlass.matmul import _capability, _device_reason, _sm_count

# The schedule (see _build.ATTN_VARIANTS) of each (head dim, causal), by key length: the first
# (longest key length, variant) whose bound holds. Chosen from
# bench/gpu/attention_cutlass_probe.py's three runs on the H200 (bench/results/h200/README.md,
# attention_cutlass_probe-probe/-variants/-heavy): at head dim 128 the persistent scheduler
# was 1.5-12% faster than one CTA a tile without a mask and up to 31% slower with the causal
# one, where taking the heavy (late) query tiles first gained 1-5%; at head dim 64 key tiles
# of 128 rows beat 64 by 13-35%, and three consumer warp groups (192 query rows) were the
# fastest from 4096 keys and 10-30% slower at 1024.
VARIANTS = {
    (64, False): ((2048, "persist_kv128"), (None, "persist_wg3_kv128")),
    (64, True): ((2048, "coop_kv128"), (None, "wg3_kv128_rev")),
    (128, False): ((None, "persist"),),
    (128, True): ((None, "coop_rev"),),
}


def variant(head_dim: int, causal: bool, k_len: int) -> str:
    """The schedule this call runs (see :data:`VARIANTS`)."""
    for bound, name in VARIANTS[head_dim, bool(causal)]:
        if bound is None or k_len <= bound:
            return name
    raise AssertionError("every VARIANTS entry ends with an unbounded schedule")


_INT_MAX = 2**31 - 1


@functools.cache
def available() -> str | None:
    """``None`` if an sm_90 GPU, ``nvcc`` and CUTLASS's FMHA headers are here, else what is
    not (decided once a process)."""
    return _device_reason() or _build.toolchain_reason() or _build.fmha_reason()


def _folded(q, k, v, batch=None):
    """``(batch, heads, [q, k, v, o strides as (batch, head, seq)])`` the kernel sees for a
    contiguous output: grouped query heads fold (batch, kv head) into the batch mode and the
    group into the head mode, with a key/value head stride of 0. ``None`` where the strides
    do not allow the fold (then each batch element is launched on its own: ``batch=1``)."""
    b, hq, lq, d = q.shape
    b = b if batch is None else batch
    hkv = k.shape[1]
    if hq == hkv:
        so = (hq * lq * d, lq * d, d)
        return b, hq, [q.stride()[:3], k.stride()[:3], v.stride()[:3], so]
    g = hq // hkv
    # (b, hk * g + gi) must be one index: batch stride = heads x head stride.
    if b > 1 and any(t.stride(0) != t.shape[1] * t.stride(1) for t in (q, k, v)):
        return None
    sq = (g * q.stride(1), q.stride(1), q.stride(2))
    kv = [(t.stride(1), 0, t.stride(2)) for t in (k, v)]
    return b * hkv, g, [sq, *kv, (g * lq * d, lq * d, d)]


def supports(q, k, v, causal=False, scale=None, attn_mask=None) -> str | None:
    """``None`` if the CUTLASS attention can serve this call, else the reason."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return None  # the launcher raises the TypeError
    if attn_mask is not None:
        return "the cutlass attention takes no attn_mask (causal=True is supported)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type not in ("cuda", "meta"):
            return f"{name} is on {t.device}; the cutlass backend needs CUDA tensors"
    if q.device.type == "cuda" and _capability(q.device) != (9, 0):
        return f"{q.device} is not sm_90; the cutlass kernels are built for Hopper"
    if q.dtype != torch.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q is {q.dtype}; the cutlass attention takes bfloat16"
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        return None  # the launcher's check names the shapes
    d, lq, lk = q.shape[3], q.shape[2], k.shape[2]
    if d not in _build.ATTN_HEAD_DIMS or k.shape[3] != d:
        return f"head_dim {d}: the cutlass attention is built for {_build.ATTN_HEAD_DIMS}"
    if lq % 8:
        return f"q_len {lq} is not a multiple of 8 (the FMHA collective requires it)"
    if lk == 0 or lq == 0:
        return "empty sequence"
    if causal and lq > lk:
        return f"causal with q_len {lq} > k_len {lk} (rows that see no key) is not served"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return None  # the launcher's check names the heads
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            return f"{name}'s head_dim must be contiguous (stride 1) for TMA"
        if any(s % 8 for s in t.stride()[:3]) or max(t.stride()) > _INT_MAX:
            return f"{name}'s strides {t.stride()} must be multiples of 8 (16-byte TMA rows)"
        if t.device.type == "cuda" and t.data_ptr() % 16:
            return f"{name}'s data pointer is not 16-byte aligned"
    mask = "causal" if causal else "full"
    return _build.not_built_reason(_build.attention_name(d, mask, variant(d, causal, lk)))


class _Plan:
    """What one call signature launches: the kernel, the folded sizes and the strides."""

    __slots__ = ("kern", "b", "h", "lq", "lk", "d", "shape", "index", "sms", "strides",
                 "stride_ptrs", "steps")  # fmt: skip

    def __init__(self, q, k, v, causal, name=None):
        b, hq, lq, d = q.shape
        name = name or variant(d, causal, k.shape[2])
        self.kern = _build.attention_kernel(d, "causal" if causal else "full", name)
        folded = _folded(q, k, v)
        # Grouped heads whose batch and head strides do not merge (the (batch, seq, heads,
        # dim) memory of an HF layer): one launch a batch element.
        self.steps = None
        if folded is None:
            folded = _folded(q, k, v, batch=1)
            self.steps = (b, q.stride(0) * 2, k.stride(0) * 2, v.stride(0) * 2, hq * lq * d * 2,
                          hq * lq * 4)  # fmt: skip
        self.b, self.h, strides = folded
        self.lq, self.lk, self.d, self.shape = lq, k.shape[2], d, (b, hq, lq, d)
        self.index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        self.sms = _sm_count(self.index)
        # int64 (batch, head, seq) strides the C entry point reads through pointers: kept alive
        # here with the plan.
        self.strides = [torch.tensor(list(s), dtype=torch.int64) for s in strides]
        self.stride_ptrs = [t.data_ptr() for t in self.strides]

    def __call__(self, q, k, v, scale):
        o = torch.empty(self.shape, device=q.device, dtype=torch.bfloat16)
        lse = torch.empty(self.shape[:3], device=q.device, dtype=torch.float32)
        sq, sk, sv, so = self.stride_ptrs
        ptrs = [q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr()]
        rest = (self.b, self.h, self.lq, self.lk, self.d, sq, sk, sv, so, scale, self.sms,
                torch._C._cuda_getCurrentRawStream(self.index))  # fmt: skip
        if torch.cuda.current_device() == self.index:
            rc = self._launch(ptrs, rest)
        else:
            with torch.cuda.device(self.index):  # CUTLASS reads the current device
                rc = self._launch(ptrs, rest)
        if rc:
            raise RuntimeError(f"cutlass attention {tuple(self.shape)}: {self.kern.error(rc)}")
        return o, lse

    def _launch(self, ptrs, rest):
        if self.steps is None:
            return self.kern.run(*ptrs, *rest)
        n, *steps = self.steps  # bytes between batch elements of q, k, v, o, lse
        for i in range(n):
            rc = self.kern.run(*(p + i * s for p, s in zip(ptrs, steps, strict=True)), *rest)
            if rc:
                return rc
        return 0


# Plans by call signature: a signature seen before passed every check, so a repeated call
# re-checks only the scale and the data pointers' alignment (as the cutlass matmul's plans).
_PLANS: dict = {}
_MAX_PLANS = 256
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a subclass may override anything: no plan


def _key(q, k, v, causal, attn_mask):
    if attn_mask is not None or not all(type(t) in _PLAIN for t in (q, k, v)):
        return None
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in (q, k, v)) + (bool(causal),)


def forward(q, k, v, causal=False, scale=None, attn_mask=None):
    """The output and the log-sum-exp of each query row (float32, natural log), as
    ``(o, lse)``; arguments as :func:`attention`."""
    key = _key(q, k, v, causal, attn_mask)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None or (q.data_ptr() | k.data_ptr() | v.data_ptr()) % 16:
        reference.check_attention_args(q, k, v, attn_mask, scale)
        reason = available() or supports(q, k, v, causal, scale, attn_mask)
        if reason is not None:
            raise registry.BackendError(f"cutlass attention cannot serve this call: {reason}")
        plan = _Plan(q, k, v, bool(causal))
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    else:
        reference.check_scale(scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return plan(q, k, v, scale)


@torch.library.custom_op("ryzen_opt::cutlass_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None
) -> torch.Tensor:
    return forward(q, k, v, causal, scale)[0]


@_attention_op.register_fake
def _(q, k, v, causal, scale):
    return q.new_empty(q.shape)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flash-attention forward with CUTLASS's Hopper FMHA collectives (forward only).

    Args:
        q: ``(B, Hq, Lq, D)`` bfloat16 on an sm_90 GPU, ``D`` 64 or 128, ``Lq`` a multiple
            of 8, head dim contiguous, other strides multiples of 8 elements.
        k, v: ``(B, Hkv, Lk, D)`` with ``Hkv`` dividing ``Hq``.
        causal: bottom-right aligned causal masking (needs ``Lq <= Lk``).
        scale: softmax scale (default ``1/sqrt(D)``).
        attn_mask: must be ``None``.

    Returns:
        ``(B, Hq, Lq, D)`` bfloat16.

    Kernels are built ahead of time (``python -m ryzen_opt.kernels.cutlass``), never inside
    a call: a call whose kernel is not built is not served (:func:`supports` says so).

    Example:
        >>> o = attention(q, k, v, causal=True)  # doctest: +SKIP
    """
    if torch.compiler.is_compiling():
        reference.check_attention_args(q, k, v, attn_mask, scale)
        return _attention_op(q, k, v, bool(causal), None if scale is None else float(scale))
    return forward(q, k, v, causal, scale, attn_mask)[0]


registry.register(
    "attention", "cutlass", ("cuda",), attention, supports=supports, available=available
)
