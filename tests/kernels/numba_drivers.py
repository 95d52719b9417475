"""Force a Numba kernel's serial or threaded driver for a test (both must be exercised)."""

from __future__ import annotations

import pytest
import torch


def force_driver(kind: str, monkeypatch, module, threshold: str):
    """Generator for a fixture: set ``module.<threshold>`` (the work size from which the
    threaded driver runs) so that ``kind`` ("serial" or "threaded") runs, yield ``kind``.
    The threaded driver gets two torch threads (the launchers take numba's from torch's) and
    is skipped where numba has a single thread."""
    import numba

    if kind == "serial":
        monkeypatch.setattr(module, threshold, 1 << 62)
        yield kind
        return
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here: the threaded driver cannot run")
    monkeypatch.setattr(module, threshold, 0)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield kind
    finally:
        torch.set_num_threads(prev)
