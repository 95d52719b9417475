"""A cached launcher for Triton kernels: one compiled-kernel lookup and one launch per call.

``kernel[grid](*args, **meta)`` costs 17 us of host time for a 3-argument kernel on an H100
(`bench/results/h100/triton_overhead.log`), and a call through ``triton.autotune`` and
``triton.heuristics`` several times that: Triton binds every argument, recomputes its
specialization, hashes a cache key, and the autotuner rebuilds its own key and config
dictionaries. At decode sizes the GPU work is a few microseconds, so that host time *is*
the call: the skinny-M matmul ran at 0.09-0.25x of cuBLAS launched eagerly.

:class:`CachedLauncher` keeps, per distinct call, the compiled kernel Triton chose and the
values of its constexpr parameters, and launches it directly through the compiled kernel's
own launcher (``CompiledKernel[grid](*args)``, the path Triton's JIT takes after binding).

What makes a cached kernel valid for a later call is that Triton would have chosen the same
binary. Triton specializes a kernel on each tensor's dtype and 16-byte alignment and on
each integer's value class (== 1, divisible by 16, 32- or 64-bit); heuristics, autotuning
keys and pruning read integer values. The cache key is therefore:

* each tensor argument: ``(dtype, data_ptr % 16 == 0)``;
* each integer, float, bool or string argument: its exact value, except the parameters named
  in ``loose``, which are keyed on Triton's own value classes only. Name an argument loose
  only when no heuristic, autotune key or grid function reads it (for example a cache length
  that changes every decode step: an exact key would miss on every call). ``loose="ints"``
  keys every integer that way; it is refused for a kernel under ``triton.autotune`` or
  ``triton.heuristics`` (they read integer values), and right for a plain ``@triton.jit``
  kernel, whose binary depends on nothing else;
* the keyword arguments (constexprs and launch options), exactly;
* the current CUDA device (a compiled kernel is loaded per device).

A miss launches through Triton as before (compiling or autotuning as needed) and then stores
the compiled kernel; every later call with the same key skips Triton's Python layer.

Limits, checked where they can be: grid callables receive only the keyword and constexpr
values (not the positional arguments); heuristics may read integer arguments and tensor
dtypes only (the key has no tensor shapes); configs with a ``pre_hook`` always take the slow
path. With ``RYZEN_OPT_DIRECT_LAUNCH=0`` in the environment, under ``TRITON_INTERPRET=1``,
on a Triton older than 3.3 (whose compiled launcher takes only the non-constexpr arguments),
or after any failure of the direct launch (warned once), every call takes the plain
``kernel[grid](...)`` path.
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch
import triton
from triton.runtime.autotuner import Autotuner, Heuristics

from ryzen_opt.kernels.triton import _common

__all__ = ["CachedLauncher", "enabled", "hooks_installed", "raw_stream", "set_enabled"]

# Entries per launcher before the cache is cleared: a bound on memory when a caller keys on a
# value that keeps changing (a miss costs one ordinary Triton launch plus a cache lookup).
_MAX_ENTRIES = 1024
_SLOW = object()  # cache value: this key always takes Triton's own path


def _triton_at_least(major: int, minor: int) -> bool:
    try:
        parts = triton.__version__.split(".")
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):  # pragma: no cover - unparsable version string
        return False


def _env_allows() -> bool:
    """``RYZEN_OPT_DIRECT_LAUNCH=0`` (or ``false``/``no``/``off``) turns the direct path off."""
    flag = os.environ.get("RYZEN_OPT_DIRECT_LAUNCH", "1").strip().lower()
    return flag not in ("0", "false", "no", "off")


_state = {
    "enabled": not _common.INTERPRET and _triton_at_least(3, 3) and _env_allows(),
    "warned": False,
}


def enabled() -> bool:
    """Whether launches go through the compiled-kernel cache (else Triton's own path)."""
    return _state["enabled"]


def set_enabled(flag: bool) -> bool:
    """Turn the direct path on or off (tests, benchmarks of the plain path); returns the old
    value. It cannot be turned on under the interpreter or on Triton < 3.3."""
    old = _state["enabled"]
    _state["enabled"] = bool(flag) and not _common.INTERPRET and _triton_at_least(3, 3)
    return old


def _value_class(v):
    """Triton's specialization of an integer: 1, a multiple of 16, or neither; 32 or 64 bit."""
    if type(v) is not int:
        return v
    return (v == 1, v % 16 == 0, -(2**31) <= v < 2**31)


def _unwrap(kernel):
    """(autotuner or None, heuristics value dicts outermost first, the JITFunction or None).

    The innermost function is ``None`` when it is not a compiled ``JITFunction`` (under the
    interpreter it is an ``InterpretedFunction``): such a launcher always takes Triton's path.
    """
    autotuner = None
    heuristics = []
    fn = kernel
    while isinstance(fn, (Autotuner, Heuristics)):
        if isinstance(fn, Autotuner):
            if autotuner is not None:
                raise TypeError("CachedLauncher: nested triton.autotune is not supported")
            autotuner = fn
        else:
            heuristics.append(fn.values)
        fn = fn.fn
    return autotuner, heuristics, (fn if isinstance(fn, triton.runtime.JITFunction) else None)


def _no_launch_hooks() -> bool:
    """No launch hook is installed (a profiler such as Proton installs them): then the
    launch needs no per-call metadata. Older Triton stores a function or ``None``, newer
    versions a ``HookChain`` with a ``calls`` list."""
    rt = triton.knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def hooks_installed() -> bool:
    """Whether a launch hook (a profiler) is installed: direct launches then go through
    the compiled kernel's own runner, which calls the hooks."""
    return not _no_launch_hooks()


def raw_stream(device: int) -> int:
    """The current CUDA stream's handle on ``device``, as Triton's driver reads it."""
    return torch._C._cuda_getCurrentRawStream(device)


def _grid3(g) -> tuple[int, int, int]:
    n = len(g)
    return (g[0], g[1] if n > 1 else 1, g[2] if n > 2 else 1)


class CachedLauncher:
    """Launch ``kernel`` (a ``@triton.jit`` function, optionally under ``triton.heuristics``
    and one ``triton.autotune``) through a cache of its compiled binaries.

    Args:
        kernel: the Triton kernel object, as it would be launched with ``kernel[grid](...)``.
        loose: parameter names keyed on Triton's value classes instead of exact values (see
            the module docstring for when that is safe), or ``"ints"`` for every parameter of
            a kernel with no autotuner or heuristics.

    Example:
        >>> launch = CachedLauncher(my_kernel)  # doctest: +SKIP
        >>> launch((triton.cdiv(n, 1024),), x, y, n, BLOCK=1024)  # doctest: +SKIP
    """

    def __init__(self, kernel, loose: tuple[str, ...] | str = ()):
        self.kernel = kernel
        self.autotuner, self.heuristics, self.jit = _unwrap(kernel)
        inner = kernel
        while hasattr(inner, "fn") and not inspect.isfunction(inner):
            inner = inner.fn
        self.name = getattr(inner, "__name__", type(kernel).__name__)
        sig = inspect.signature(inner)
        self.arg_names = list(sig.parameters)
        self.defaults = {
            name: p.default
            for name, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        if loose == "ints":
            if self.autotuner is not None or self.heuristics:
                raise ValueError(
                    f"loose='ints' needs a kernel without autotune or heuristics; {self.name} "
                    "has them, and they read integer values: name the loose parameters"
                )
            loose = tuple(self.arg_names)
        elif isinstance(loose, str):
            raise ValueError(f"loose must be a tuple of parameter names or 'ints', got {loose!r}")
        unknown = set(loose) - set(self.arg_names)
        if unknown:
            raise ValueError(f"loose names parameters the kernel does not have: {sorted(unknown)}")
        self.loose = tuple(sorted(self.arg_names.index(name) for name in loose))
        self._cache: dict = {}
        self._lead = -1  # leading tensor arguments, learned on the first miss (-1: unknown)
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"CachedLauncher({self.name}, entries={len(self._cache)})"

    def _key(self, args, kwargs):
        lead = self._lead
        feats = None
        if lead >= 0:
            # Fast form: the first ``lead`` arguments are the tensors, the rest plain values.
            try:
                feats = [(a.dtype, a.data_ptr() % 16 == 0) for a in args[:lead]]
                feats.extend(args[lead:])
            except AttributeError:  # not a tensor where one was: the general form
                feats = None
        if feats is None:
            feats = [
                (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
                for a in args
            ]
        for i in self.loose:
            if i < len(feats):
                feats[i] = _value_class(feats[i])
        return (torch.cuda.current_device(), tuple(feats), tuple(kwargs.items()))

    def _learn_layout(self, args) -> None:
        """Use the fast key form when the tensors lead the arguments (every kernel here puts
        its pointers first); a later call that breaks the pattern keys the slow way."""
        lead = 0
        while lead < len(args) and isinstance(args[lead], torch.Tensor):
            lead += 1
        if any(isinstance(a, torch.Tensor) for a in args[lead:]):
            lead = -1
        self._lead = lead

    def __call__(self, grid, *args, **kwargs) -> None:
        """Launch on ``grid`` (a tuple, or a callable of the constexpr/keyword values)."""
        if not _state["enabled"] or self.jit is None:
            self.kernel[grid](*args, **kwargs)
            return
        key = self._key(args, kwargs)
        entry = self._cache.get(key)
        if entry is None:
            self.misses += 1
            self._miss(key, grid, args, kwargs)
            return
        if entry is _SLOW:
            self.kernel[grid](*args, **kwargs)
            return
        self.hits += 1
        compiled, meta, tail = entry
        g = grid(meta) if callable(grid) else grid
        if _no_launch_hooks():
            # What the compiled kernel's own runner does, minus its per-call closure and its
            # device and stream lookups (the key already read the device).
            n = len(g)
            try:
                compiled.run(
                    g[0], g[1] if n > 1 else 1, g[2] if n > 2 else 1, raw_stream(key[0]),
                    compiled.function, compiled.packed_metadata, None, None, None, *args, *tail,
                )  # fmt: skip
                return
            except Exception as e:  # noqa: BLE001 - fall through to the runner, then Triton
                self._fail(e)
                self.kernel[grid](*args, **kwargs)
                return
        self._direct(compiled, g, args, tail, grid, kwargs)

    def entry(self, args, kwargs):
        """The cached ``(compiled kernel, meta, constexpr values)`` a call with these arguments
        launches directly, or ``None`` when it would take Triton's own path (direct launches
        off, a launch hook installed, a key not yet seen or kept on the slow path). Callers
        that replay one call signature many times (the matmul's eager plans) launch it
        themselves through ``compiled.run`` with the same arguments."""
        if not _state["enabled"] or self.jit is None or not _no_launch_hooks():
            return None
        found = self._cache.get(self._key(args, kwargs))
        return None if found is None or found is _SLOW else found

    def _fail(self, e: Exception) -> None:
        _state["enabled"] = False
        if not _state["warned"]:
            _state["warned"] = True
            warnings.warn(
                f"ryzen_opt: direct Triton launch of {self.name} failed "
                f"({type(e).__name__}: {e}); launching through Triton's JIT from now on",
                RuntimeWarning,
                stacklevel=4,
            )

    def _direct(self, compiled, g, args, tail, grid, kwargs) -> None:
        try:
            compiled[_grid3(g)](*args, *tail)
        except Exception as e:  # noqa: BLE001 - any failure: the plain path, for good
            self._fail(e)
            self.kernel[grid](*args, **kwargs)

    def _miss(self, key, grid, args, kwargs) -> None:
        if len(self._cache) >= _MAX_ENTRIES:
            self._cache.clear()
        lead = self._lead
        if (
            lead < 0
            or any(isinstance(a, torch.Tensor) for a in args[lead:])
            or not all(isinstance(a, torch.Tensor) for a in args[:lead])
        ):
            # First call, or the tensors moved: relearn, and rebuild this call's key so that
            # no tensor object is held in the cache.
            self._learn_layout(args)
            key = self._key(args, kwargs)
        meta = dict(kwargs)
        launched = False
        if self.autotuner is not None:
            self.kernel[grid](*args, **kwargs)  # tunes on first sight of its key, launches
            launched = True
            cfg = self.autotuner.best_config
            if cfg.pre_hook is not None:
                self._cache[key] = _SLOW
                return
            meta.update(cfg.all_kwargs())
        if self.heuristics:
            named = dict(zip(self.arg_names, args, strict=False))
            for values in self.heuristics:
                for name, fn in values.items():
                    named.update(meta)
                    meta[name] = fn(named)
        constexprs = {}
        for name in self.arg_names[len(args) :]:
            if name in meta:
                constexprs[name] = meta[name]
            elif name in self.defaults:
                constexprs[name] = self.defaults[name]
            else:
                raise TypeError(f"{self.name}: missing argument {name!r}")
        names = set(self.arg_names)
        options = {k: v for k, v in meta.items() if k not in names}
        g = grid(meta) if callable(grid) else grid
        compiled = self.jit.warmup(*args, grid=_grid3(g), **constexprs, **options)
        if hasattr(compiled, "result"):  # an asynchronous compile
            compiled = compiled.result()
        tail = tuple(constexprs.values())
        self._cache[key] = (compiled, meta, tail)
        if not launched:
            self._direct(compiled, g, args, tail, grid, kwargs)
