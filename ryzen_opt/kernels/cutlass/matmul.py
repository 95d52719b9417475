"""CUTLASS matmul on Hopper: ``activation(a @ b + bias)`` in one ping-pong kernel.

Serves bfloat16 2-D products (``a`` may be 3-D and contiguous; its leading dims are rows) on
sm_90 GPUs where the problem fills 128 x 128 tiles (M >= 128 and M*N*K >= 2**27): the MLP
and attention projections of prefill and training. ``b`` is either ``w.t()`` of an nn.Linear
weight ``w`` (N, K) or a row-major (K, N) matrix; K and N must be multiples of 8 and every
operand 16-byte aligned (TMA). Decode-size products, float16/float32, a residual or another
output dtype stay with the Triton backend: :func:`supports` says why for each call.

On the H200 (``bench/results/h200/README.md``): matmul + bias + GELU at 8192 x 4096 -> 16384
and the bf16 products at 4096^3 and 8192^3 against cuBLAS, side by side with the Triton
kernels, in ``python -m bench.triton_kernels --only matmul``.
"""

from __future__ import annotations

import functools

import torch

from ryzen_opt.kernels import reference, registry
from ryzen_opt.kernels.cutlass import _build

# Below this many multiply-adds the Triton kernels' smaller and split-K tiles fit better.
MIN_MACS = 2**27
MIN_ROWS = 128
# The persistent scheduler's tile-order swizzle from this many output elements on (8 tiles;
# below it CUTLASS's default, 1). bench/gpu/cutlass_probe.py on the H200: 8 was 1.6% faster
# at 8192 x 8192 (K = 8192) and 8192 x 16384 outputs, 0.4-1% slower at 4096 x 4096, and at
# 8192 x 8192 with K = 1024 0.8% slower in one run (cutlass_probe-swizzle.log) and 1.2%
# faster in another (cutlass_probe-host.log).
SWIZZLE_FROM = 2**26


@functools.lru_cache(maxsize=1)
def _device_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    if (9, 0) not in caps:
        return f"the cutlass kernels are built for sm_90 (Hopper); devices here: {sorted(caps)}"
    return None


@functools.cache
def available() -> str | None:
    """``None`` if an sm_90 GPU, ``nvcc`` and CUTLASS's headers are here, else what is not.

    Decided once a process (finding the toolchain stats files: ~0.1 ms, too much per call)."""
    return _device_reason() or _build.toolchain_reason()


@functools.lru_cache(maxsize=16)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _layout(b: torch.Tensor) -> str | None:
    """``"nk"`` for ``w.t()`` of a contiguous (N, K) weight, ``"kn"`` for a contiguous
    (K, N) matrix, else ``None``."""
    k, n = b.shape
    if b.stride() == (1, k) or (n == 1 and b.stride(0) == 1):
        return "nk"
    if b.stride() == (n, 1) or (k == 1 and b.stride(1) == 1):
        return "kn"
    return None


def _aligned(t: torch.Tensor) -> bool:
    return t.device.type == "meta" or t.data_ptr() % 16 == 0


def supports(a, b, bias=None, activation=None, residual=None, out_dtype=None) -> str | None:
    """``None`` if the CUTLASS matmul can serve this call, else the reason."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None  # the launcher raises the TypeError that names the argument
    for name, t in (("a", a), ("b", b), ("bias", bias)):
        if isinstance(t, torch.Tensor) and t.device.type not in ("cuda", "meta"):
            return f"{name} is on {t.device}; the cutlass backend needs CUDA tensors"
    if a.device.type == "cuda" and _capability(a.device) != (9, 0):
        return f"{a.device} is not sm_90; the cutlass kernels are built for Hopper"
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return f"a is {a.dtype}; the cutlass matmul takes bfloat16"
    if residual is not None:
        return "the cutlass matmul fuses no residual (the triton backend does)"
    if out_dtype not in (None, torch.bfloat16):
        return f"out_dtype {out_dtype}: the cutlass matmul writes bfloat16"
    if activation not in _build.ACTIVATIONS:
        return f"activation {activation!r} has no cutlass epilogue"
    if b.dim() != 2 or a.dim() not in (2, 3):
        return "the cutlass matmul takes a 2-D b and a 2-D or 3-D a"
    k, n = b.shape
    if a.shape[-1] != k:
        return None  # the launcher's check names the mismatch
    m = a.numel() // k if k else 0
    if not a.is_contiguous():
        return "a must be contiguous (row-major, K innermost) for the cutlass matmul"
    if _layout(b) is None:
        return "b must be w.t() of a contiguous (N, K) weight or a contiguous (K, N) matrix"
    if k % 8 or n % 8:
        return f"K ({k}) and N ({n}) must be multiples of 8 (16-byte TMA rows)"
    if m < MIN_ROWS or m * n * k < MIN_MACS:
        return f"{m}x{n}x{k} is under 128 rows or 2**27 multiply-adds (the triton tiles fit)"
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.stride(0) != 1):
        return "bias must be a contiguous bfloat16 vector for the cutlass matmul"
    if not all(_aligned(t) for t in (a, b, bias) if t is not None):
        return "an operand's data pointer is not 16-byte aligned"
    return _build.not_built_reason(_build.kernel_name(_layout(b), activation))


@functools.lru_cache(maxsize=16)
def _zeros(n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, device=device, dtype=torch.bfloat16)


@functools.lru_cache(maxsize=256)
def _workspace(kern, m: int, n: int, k: int, sms: int) -> int:
    return kern.workspace(m, n, k, sms)


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class _Plan:
    """What one call signature launches: the kernel and its sizes (no data pointers)."""

    __slots__ = ("kern", "m", "n", "k", "shape", "index", "sms", "ws", "swizzle", "zeros")

    def __init__(self, a, b, bias, activation):
        self.kern = _build.kernel(_layout(b), activation)
        self.k, self.n = b.shape
        self.m = a.numel() // self.k
        self.shape = (*a.shape[:-1], self.n)
        self.index = a.device.index if a.device.index is not None else torch.cuda.current_device()
        self.sms = _sm_count(self.index)
        self.ws = _workspace(self.kern, self.m, self.n, self.k, self.sms)
        self.swizzle = 8 if self.m * self.n >= SWIZZLE_FROM else 1
        self.zeros = _zeros(self.n, a.device) if bias is None else None

    def __call__(self, a, b, bias):
        out = torch.empty(self.shape, device=a.device, dtype=torch.bfloat16)
        ws = torch.empty(self.ws, device=a.device, dtype=torch.uint8) if self.ws else None
        bias_t = self.zeros if bias is None else bias
        args = (
            a.data_ptr(), b.data_ptr(), bias_t.data_ptr(), out.data_ptr(), self.m, self.n,
            self.k, ws.data_ptr() if ws is not None else None, self.ws, self.sms,
            torch._C._cuda_getCurrentRawStream(self.index), self.swizzle,
        )  # fmt: skip
        if torch.cuda.current_device() == self.index:
            rc = self.kern.run(*args)
        else:
            with torch.cuda.device(self.index):  # CUTLASS reads the current device
                rc = self.kern.run(*args)
        if rc:
            raise RuntimeError(f"cutlass matmul {self.m}x{self.n}x{self.k}: {self.kern.error(rc)}")
        return out


# Plans by call signature: a signature seen before passed every check (only the data
# pointers' alignment is checked again), which cuts the Python cost of a call from ~63 to
# ~30 us on the H200 host (cutlass_probe-host.log).
_PLANS: dict = {}
_MAX_PLANS = 256


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a subclass may override anything: no plan


def _sig(t):
    if type(t) not in _PLAIN:
        raise TypeError
    return (t.shape, t.stride(), t.dtype, t.device)


def _plan_key(a, b, bias, activation, residual, out_dtype):
    try:
        return (
            _sig(a), _sig(b), None if bias is None else _sig(bias), activation,
            residual is None, out_dtype,
        )  # fmt: skip
    except TypeError:
        return None  # not plain tensors: the checks say what is wrong


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``activation(a @ b + bias)`` with a CUTLASS ping-pong kernel (sm_90, bfloat16).

    Args:
        a: ``(M, K)`` or ``(B, M, K)``, contiguous bfloat16 on an sm_90 GPU.
        b: ``(K, N)``: ``w.t()`` of an nn.Linear weight or a contiguous matrix.
        bias: optional ``(N,)`` bfloat16.
        activation: ``None``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``"relu"``.
        residual: must be ``None``; out_dtype: ``None`` or bfloat16 (see :func:`supports`).

    Returns:
        ``(..., M, N)`` bfloat16, fp32-accumulated.

    Kernels are built ahead of time (``python -m ryzen_opt.kernels.cutlass``), never inside
    a call: a call whose kernel is not built is not served (:func:`supports` says so).

    Example:
        >>> y = matmul(x, w.t(), bias=b, activation="gelu")  # doctest: +SKIP
    """
    key = _plan_key(a, b, bias, activation, residual, out_dtype)
    plan = _PLANS.get(key) if key is not None else None
    if (
        plan is not None
        and (a.data_ptr() | b.data_ptr() | (0 if bias is None else bias.data_ptr())) % 16 == 0
    ):
        return plan(a, b, bias)
    reference.check_matmul_args(a, b, bias, activation, residual, out_dtype)
    reason = available() or supports(a, b, bias, activation, residual, out_dtype)
    if reason is not None:
        raise registry.BackendError(f"cutlass matmul cannot serve this call: {reason}")
    plan = _Plan(a, b, bias, activation)
    if key is not None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan(a, b, bias)


registry.register("matmul", "cutlass", ("cuda",), matmul, supports=supports, available=available)
