"""Shared test set-up: Triton runs in its interpreter when there is no GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported: it decides at @triton.jit time.
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
