"""Shared test set-up: Triton runs in its interpreter when there is no GPU; hypothesis
profiles that make property tests deterministic in CI and reproducible locally."""

import os

import pytest
import torch
from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase

if not torch.cuda.is_available():
    # Must be set before triton is imported: it decides at @triton.jit time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI (CI=true): the same examples every run (derandomize), no example database, so a red build
# is a real failure that reruns red. Locally: random examples, failures saved to
# .hypothesis/examples and replayed first on the next run, and print_blob prints the
# @reproduce_failure line. Test data are drawn by hypothesis (a seed per example), so the
# printed example is the whole input. `pytest --hypothesis-profile=...` overrides.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile(
    "dev", print_blob=True, database=DirectoryBasedExampleDatabase(".hypothesis/examples")
)
_IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
settings.load_profile("ci" if _IN_CI else "dev")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
