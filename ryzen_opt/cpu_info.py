"""The CPU's vector instruction set, detected at run time.

Machines that run the same code differ: one cloud VM exposed AVX2+FMA only (its hypervisor
hid AVX-512), another exposes AVX-512 with bf16 and VNNI. Benchmarks and ``optimize()``'s
report print what this machine has, from the kernel's CPU flags (``/proc/cpuinfo``) when
present, and what PyTorch's own CPU kernels dispatch to
(``torch.backends.cpu.get_cpu_capability()``).

Example:
    >>> from ryzen_opt.cpu_info import isa_from_flags
    >>> isa_from_flags("fpu sse2 avx fma avx2")
    'AVX2+FMA'
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["cpu_flags", "cpu_isa", "isa_from_flags", "torch_cpu_capability"]

# AVX-512 subsets worth naming: the ones the bf16/int8 and 512-bit fp32 paths of compilers
# and oneDNN use. Listed in this order when present.
_AVX512_EXTRAS = ("avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx512_fp16")
_AMX = ("amx_bf16", "amx_int8")


def _normalise(flags: str | Iterable[str]) -> set[str]:
    if isinstance(flags, str):
        return set(flags.lower().split())
    try:
        items = list(flags)
    except TypeError:
        raise TypeError(
            f"flags must be a string or an iterable of strings, got {type(flags).__name__}"
        ) from None
    if not all(isinstance(f, str) for f in items):
        raise TypeError("flags must be a string or an iterable of strings")
    return {f.lower() for f in items}


def isa_from_flags(flags: str | Iterable[str]) -> str:
    """Name the widest vector ISA in a CPU flag list (``/proc/cpuinfo``'s ``flags`` line).

    Args:
        flags: the flags, space-separated or as an iterable (x86 names such as ``avx2``;
            AArch64 ``Features`` names such as ``asimd``/``sve`` are recognised too).

    Returns:
        ``"AVX512 (avx512f, ...)"`` naming the AVX-512 subsets present, ``"AVX2+FMA"``,
        ``"AVX2"``, ``"AVX"``, ``"SSE4.2"``, ``"SVE"``, ``"NEON"``, or ``"unknown"``.

    Example:
        >>> isa_from_flags("avx2 fma avx512f avx512_bf16 avx512_vnni")
        'AVX512 (avx512f, avx512_bf16, avx512_vnni)'
    """
    f = _normalise(flags)
    if "avx512f" in f:
        present = ["avx512f", *(x for x in _AVX512_EXTRAS + _AMX if x in f)]
        return f"AVX512 ({', '.join(present)})"
    if "avx2" in f:
        return "AVX2+FMA" if "fma" in f else "AVX2"
    if "avx" in f:
        return "AVX"
    if "sse4_2" in f:
        return "SSE4.2"
    if "sve" in f:
        return "SVE"
    if "asimd" in f or "neon" in f:
        return "NEON"
    return "unknown"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The first processor's flags from ``cpuinfo`` (``None`` where the file does not exist).

    Reads the ``flags`` line (x86) or the ``Features`` line (AArch64).
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def torch_cpu_capability() -> str:
    """What PyTorch's CPU kernels dispatch to (``AVX512``, ``AVX2``, ``DEFAULT``...)."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception as e:  # an old torch without the call: say so rather than guess
        return f"unknown ({type(e).__name__})"


def cpu_isa(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """This machine's vector ISA, for headers and reports.

    From the CPU flags when ``cpuinfo`` exists, else PyTorch's capability; with PyTorch's
    capability appended, since a build or an environment variable (``ATEN_CPU_CAPABILITY``)
    can make its kernels use less than the CPU has.

    Returns:
        e.g. ``"AVX512 (avx512f, avx512bw, avx512_bf16, avx512_vnni); torch: AVX512"`` or
        ``"AVX2+FMA; torch: AVX2"``.
    """
    flags = cpu_flags(cpuinfo)
    cap = torch_cpu_capability()
    name = isa_from_flags(flags) if flags else f"flags not readable, torch reports {cap}"
    return f"{name}; torch: {cap}"
