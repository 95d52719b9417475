"""On-disk cache of timing decisions, keyed by device, library versions, op and shape.

Only timings are cached: the numerical check of a candidate runs on every ``optimize()``
call, on the model's own weights, so a cached entry can never let a wrong kernel through.
The file is replaced atomically (temp file + ``os.replace``) while holding an ``flock`` on
``decisions.json.lock``, after re-reading it and merging: two processes optimizing at once
both keep their decisions. A file that is not valid JSON of the expected layout is ignored
and rebuilt; single entries that are not a valid timing are dropped and re-measured. A
folder that cannot be written (read-only, a file in its place, ``decisions.json`` a folder)
is warned about once and noted in the report; ``optimize()`` still returns its result.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.models.config import short_repr

try:  # POSIX; elsewhere saves are not serialised between processes (last writer wins)
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None

FILE_NAME = "decisions.json"
_FORMAT = 1


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of the libraries a timing depends on."""
    from ryzen_opt import __version__

    return {
        "ryzen_opt": __version__,
        "torch": torch.__version__,
        "numba": _version("numba"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    """A name for the hardware a timing was taken on (CPU model + threads, or GPU name)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        return f"cuda:{torch.cuda.get_device_name(idx)} sm{cap[0]}{cap[1]}"
    return f"cpu:{_cpu_name()} threads={torch.get_num_threads()}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def entry_problem(value: Any) -> str | None:
    """Why a cached timing cannot be used (``None`` if it can), naming the bad field."""
    if not isinstance(value, dict):
        return f"an entry must be an object, got {type(value).__name__}"
    for name in ("speedup", "baseline_s", "candidate_s"):
        x = value.get(name)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return f"{name} must be a finite number, got {short_repr(x, 60)}"
        if x < 0 or (name == "speedup" and x == 0):
            return f"{name} must be {'> 0' if name == 'speedup' else '>= 0'}, got {x!r}"
    ci = value.get("ci")
    if not (
        isinstance(ci, list)
        and len(ci) == 2
        and all(
            not isinstance(c, bool) and isinstance(c, (int, float)) and math.isfinite(c) for c in ci
        )
        and 0 <= ci[0] <= ci[1]
    ):
        return f"ci must be [low, high] with 0 <= low <= high, got {short_repr(ci, 60)}"
    n = value.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"n must be an int >= 1, got {short_repr(n, 60)}"
    return None


def _read_entries(path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Valid entries of the file at ``path`` and why the others were dropped.

    Raises OSError / ValueError when the file cannot be read or is not the cache's layout.
    """
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError("unexpected layout")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise ValueError("entries must map keys to objects")
    good, dropped = {}, []
    for key, value in entries.items():
        why = entry_problem(value)
        if why is None:
            good[key] = value
        else:
            dropped.append(f"{short_repr(key, 80)}: {why}")
    return good, dropped


# Cache files already warned about in this process: one warning each, however many
# optimize() calls meet the same unwritable folder (every report still records it).
_WARNED: set[str] = set()


def _warn_once(path: Path, message: str) -> None:
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        warnings.warn(message, RuntimeWarning, stacklevel=4)


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive ``flock`` on ``lock_path`` (created if needed) for the ``with`` block."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class DecisionCache:
    """Timing results by key; ``enabled=False`` keeps them in memory only.

    Within one run the in-memory table is shared by every site, so two layers of one shape
    are timed once. Entries that are not a valid timing are dropped on load (with a warning
    and a note). :meth:`save` merges with whatever other processes wrote meanwhile, under a
    lock file next to ``decisions.json``, and a cache that cannot be written costs a warning
    and a note, never the result.
    """

    def __init__(self, directory: Path, enabled: bool = True) -> None:
        self.path = Path(directory) / FILE_NAME
        self.lock_path = Path(directory) / (FILE_NAME + ".lock")
        self.enabled = enabled
        self.notes: list[str] = []  # what happened to the file on disk, for the report
        self._entries: dict[str, dict[str, Any]] = {}
        self._new: dict[str, dict[str, Any]] = {}  # measured in this run: merged on save
        self._dirty = False
        if enabled:
            self._load()

    def _load(self) -> None:
        try:
            if not self.path.exists():
                return
            entries, dropped = _read_entries(self.path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            self.notes.append(
                f"cache file {str(self.path)!r} ignored and rebuilt ({short_repr(str(e))})"
            )
            self._dirty = True  # rewrite it even if nothing new is measured
            return
        if dropped:
            msg = (
                f"cache file {str(self.path)!r}: dropped {len(dropped)} invalid "
                f"entr{'y' if len(dropped) == 1 else 'ies'} (re-measured): {dropped[0]}"
            )
            self.notes.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            self._dirty = True
        self._entries = entries

    @staticmethod
    def key(**parts: Any) -> str:
        """A stable string key from JSON-able parts."""
        return json.dumps(parts, sort_keys=True, default=str)

    @staticmethod
    def record(cmp) -> dict[str, Any]:
        """What is stored of one :func:`ryzen_opt.timing.compare` result."""
        return {
            "speedup": cmp.speedup,
            "ci": [cmp.ci_low, cmp.ci_high],
            "baseline_s": cmp.baseline.median,
            "candidate_s": cmp.candidate.median,
            "n": cmp.baseline.n,
        }

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._entries[key] = value
        self._new[key] = value
        self._dirty = True

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> str | None:
        """Merge this run's entries into the file, atomically, under the lock.

        Entries another process wrote since this cache was loaded are kept (for a key both
        measured, this run's value wins). Returns ``None``, or, when the file cannot be
        written, the reason (also warned once per file and kept in :attr:`notes`).
        """
        if not (self.enabled and self._dirty):
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.lock_path):
                try:
                    on_disk, _ = _read_entries(self.path)
                except (OSError, ValueError, UnicodeDecodeError):
                    on_disk = {}  # missing or unreadable: the notes of _load say which
                # Another process's newer value beats our loaded copy; what we measured beats both.
                merged = {**self._entries, **on_disk, **self._new}
                data = {"format": _FORMAT, "entries": merged}
                atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True))
        except OSError as e:
            msg = (
                f"decision cache {str(self.path)!r} could not be written "
                f"({type(e).__name__}: {short_repr(str(e))}); the result is unaffected, the "
                "timings will be measured again next time (set OptimizeConfig(cache_dir=...) "
                "or RYZEN_OPT_CACHE_DIR to a writable folder, or use_cache=False)"
            )
            self.notes.append(msg)
            _warn_once(self.path, msg)
            return msg
        self._entries, self._new, self._dirty = merged, {}, False
        return None
