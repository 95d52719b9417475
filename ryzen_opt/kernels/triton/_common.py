"""Helpers shared by the Triton launchers: interpreter mode, device checks, dot precision.

Under ``TRITON_INTERPRET=1`` (CPU CI) Triton runs kernels in its NumPy interpreter on CPU
tensors, so the launchers accept device ``cpu`` there and only there.
"""

from __future__ import annotations

import functools
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES: tuple[str, ...] = ("cuda", "cpu") if INTERPRET else ("cuda",)

# Triton 3.9's interpreter multiplies bfloat16 tiles as raw 16-bit integers (relative error
# ~4e9 on a 16x16 product), so under the interpreter kernels upcast bf16 operands of tl.dot
# to fp32 first. On the GPU the operands stay bf16 for the tensor cores.
UPCAST_BF16_DOT = INTERPRET


def available() -> str | None:
    """``None`` when Triton imports and there is a GPU (or the interpreter), else why not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton does not import: {type(e).__name__}: {e}"
    if not INTERPRET and not torch.cuda.is_available():
        return "triton needs a CUDA GPU (or TRITON_INTERPRET=1)"
    return None


def device_reason(name: str, t: torch.Tensor, allow_meta: bool = True) -> str | None:
    """Why ``t`` cannot feed a Triton kernel because of its device, or ``None``.

    ``supports`` is asked about meta tensors (decisions from shapes alone), so meta passes
    there; the launchers call :func:`check_device`, which refuses it.
    """
    if t.device.type in DEVICES or (allow_meta and t.device.type == "meta"):
        return None
    return f"{name} is on {t.device}; the triton backend needs CUDA tensors"


def check_device(name: str, t: torch.Tensor) -> None:
    reason = device_reason(name, t, allow_meta=False)
    if reason is not None:
        raise ValueError(reason)


@functools.lru_cache(maxsize=8)
def pdl_supported(device_index: int) -> bool:
    """Programmatic dependent launch (a kernel starts while the previous one finishes, and
    waits in ``gdc_wait`` for its results): Hopper (sm90) and newer, not the interpreter."""
    if INTERPRET or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def upcast_dot(dtype: torch.dtype) -> bool:
    return UPCAST_BF16_DOT and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot: fp32 inputs use TF32 only when PyTorch allows it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=8)
def num_sms(device_index: int) -> int:
    if INTERPRET or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.type == "cuda" and t.device.index is not None else 0


def pow2_bucket(x: int) -> int:
    """Autotune key bucket: the next power of two (>= 1), so nearby sizes share a config."""
    return next_pow2(x)


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Host-side integer helpers. ``triton.cdiv`` and ``triton.next_power_of_2`` are Triton
# constexpr functions: called from Python they cost 2.4-3.8 us each (Triton 3.9), and a
# launcher calls several per launch.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers."""
    return -(a // -b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


# Scratch buffers per (tag, device, stream). Kernels on one stream run in order, so a later
# launch on that stream may reuse what an earlier one used; two streams never share one.
_SCRATCH: dict[tuple[str, int, int], torch.Tensor] = {}
# Buffers larger than this are allocated per call rather than kept.
KEEP_SCRATCH_BYTES = 64 << 20


def stream_scratch(
    tag: str, device: torch.device, numel: int, dtype: torch.dtype, zeroed: bool = False
) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements for the current stream, kept between calls.

    ``torch.empty`` costs ~3 us of host time on a GPU; decode-size launches cost little more,
    so their workspaces are kept. With ``zeroed`` the buffer is zero when first made and the
    caller must leave it zeroed (split-K tile counters). Under CUDA-graph capture every call
    gets a fresh buffer from the graph's pool (zeroed by a memset node if asked), and the
    eager cache is not touched.
    """
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            make = torch.zeros if zeroed else torch.empty
            return make(numel, device=device, dtype=dtype)
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (tag, index, torch._C._cuda_getCurrentRawStream(index))
    else:
        key = (tag, -1, 0)  # the interpreter's CPU tensors: one "stream"
    buf = _SCRATCH.get(key)
    if buf is not None and buf.numel() >= numel and buf.dtype == dtype:
        return buf
    make = torch.zeros if zeroed else torch.empty
    buf = make(max(numel, 1024), device=device, dtype=dtype)
    if numel * buf.element_size() <= KEEP_SCRATCH_BYTES:
        _SCRATCH[key] = buf
    return buf
