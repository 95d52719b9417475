"""Every Triton kernel reads only module globals the compiler accepts.

The interpreter (``TRITON_INTERPRET=1``, what CI runs) lets a kernel read a plain float
global; the compiler refuses it ("Cannot access global variable ... from within @jit'ed
function") unless it is a ``tl.constexpr``. This check catches that on the CPU: it walks
every ``@triton.jit`` function in ``ryzen_opt.kernels.triton`` and the names it reads from
its module."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import ryzen_opt.kernels.triton as package  # noqa: E402


def _jit_functions():
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if isinstance(fn, types.FunctionType) and fn.__module__ == module.__name__:
                yield f"{info.name}.{name}", fn


def _accepted(value) -> bool:
    if isinstance(value, (types.ModuleType, tl.constexpr)):
        return True
    # other jit functions, and Triton's own builtins imported by name
    return isinstance(getattr(value, "fn", None), types.FunctionType) or (
        getattr(value, "__module__", "") or ""
    ).startswith("triton")


def test_the_walk_finds_the_kernels():
    names = {name for name, _ in _jit_functions()}
    assert "ryzen_opt.kernels.triton.training.gelu_op._gelu_kernel" in names
    assert len(names) >= 20


def test_no_kernel_reads_a_global_the_compiler_refuses():
    bad = []
    for name, fn in _jit_functions():
        for g, value in inspect.getclosurevars(fn).globals.items():
            if not _accepted(value):
                bad.append(f"{name} reads {g} = {value!r} ({type(value).__name__})")
    assert not bad, "make these tl.constexpr(...) or pass them as arguments:\n" + "\n".join(bad)


def test_the_check_catches_a_plain_float_global():
    assert not _accepted(0.5) and _accepted(tl.constexpr(0.5)) and _accepted(tl)
