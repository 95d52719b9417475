"""Kernel tests: a case parametrized with ``backend="triton"`` builds its tensors on the GPU."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _triton_on_the_gpu(request):
    # On a CUDA machine the triton backend serves CUDA tensors only (its interpreter, which
    # takes CPU tensors, runs where there is no GPU): its cases build their tensors there.
    spec = getattr(request.node, "callspec", None)
    if spec is None or spec.params.get("backend") != "triton" or not torch.cuda.is_available():
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)
