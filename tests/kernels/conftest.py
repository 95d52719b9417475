"""Kernel tests: a case parametrized with ``backend="triton"`` builds its tensors on the GPU."""

import stat

import pytest
import torch

from ryzen_opt.kernels.cutlass import _build


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


@pytest.fixture
def toolchain(tmp_path, monkeypatch):
    """A stand-in nvcc and CUTLASS tree; returns (nvcc log file, cache root)."""
    root = tmp_path / "cutlass"
    (root / "include" / "cutlass").mkdir(parents=True)
    (root / "include" / "cutlass" / "cutlass.h").write_text("// stand-in\n")
    (root / "tools" / "util" / "include").mkdir(parents=True)
    (root / "examples" / _build.FMHA_EXAMPLE).mkdir(parents=True)  # the attention's headers
    calls = tmp_path / "nvcc.log"
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "Cuda compilation tools, release 0.0"; exit 0; fi\n'
        f'echo "$@" >> {calls}\n'
        'if [ -n "$FAKE_NVCC_FAIL" ]; then echo "error: $FAKE_NVCC_FAIL" >&2; exit 2; fi\n'
        "while [ $# -gt 1 ]; do shift; done\n"  # the last argument is the output
        'printf so > "$1"\n'
    )
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    cache = tmp_path / "cache"
    monkeypatch.setenv("NVCC", str(nvcc))
    monkeypatch.setenv("CUTLASS_DIR", str(root))
    monkeypatch.setenv("RYZEN_OPT_CUTLASS_CACHE", str(cache))
    _build._nvcc_version.cache_clear()
    yield calls, cache
    _build._nvcc_version.cache_clear()
