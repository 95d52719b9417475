"""On-disk cache of timing decisions, keyed by device, library versions, op and shape.

Only timings are cached: the numerical check of a candidate runs on every ``optimize()``
call, on the model's own weights, so a cached entry can never let a wrong kernel through.
The file is replaced atomically (temp file + ``os.replace``); a file that is not valid JSON
of the expected layout is ignored and rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

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


class DecisionCache:
    """Timing results by key; ``enabled=False`` keeps them in memory only.

    Within one run the in-memory table is shared by every site, so two layers of one shape
    are timed once.
    """

    def __init__(self, directory: Path, enabled: bool = True) -> None:
        self.path = Path(directory) / FILE_NAME
        self.enabled = enabled
        self.note: str | None = None  # why a file on disk was not used, for the report
        self._entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        if enabled:
            self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise ValueError("unexpected layout")
            entries = data["entries"]
            if not isinstance(entries, dict) or not all(
                isinstance(v, dict) for v in entries.values()
            ):
                raise ValueError("entries must map keys to objects")
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
            self.note = f"cache file {str(self.path)!r} ignored and rebuilt ({e})"
            self._dirty = True  # rewrite it even if nothing new is measured
            return
        self._entries = dict(entries)

    @staticmethod
    def key(**parts: Any) -> str:
        """A stable string key from JSON-able parts."""
        return json.dumps(parts, sort_keys=True, default=str)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._entries[key] = value
        self._dirty = True

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> None:
        """Write the file (atomically) if anything changed and the cache is enabled."""
        if not (self.enabled and self._dirty):
            return
        data = {"format": _FORMAT, "entries": self._entries}
        atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True))
        self._dirty = False
