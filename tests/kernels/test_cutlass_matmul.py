"""CUTLASS matmul backend: what it serves, how it is built, and (GPU) its results.

The build logic runs here against a stand-in ``nvcc`` (a shell script that records its
arguments and writes the output file); the kernels themselves only on an sm_90 GPU (``gpu``).
"""

import os
import subprocess
import sys

import pytest
import torch

from ryzen_opt.kernels import BackendError, reference, registry
from ryzen_opt.kernels.cutlass import _build
from ryzen_opt.kernels.cutlass import matmul as cm
from tests.assertions import TOL, assert_close_rel

BF16 = torch.bfloat16


def _meta(*shape, dtype=BF16):
    return torch.empty(*shape, device="meta", dtype=dtype)


# ----------------------------------------------------------------------------- supports


def test_registered_for_matmul_on_cuda_only():
    b = registry.backends("matmul")["cutlass"]
    assert b.devices == ("cuda",)
    assert "cutlass" not in registry.import_errors()


def test_supports_a_linear_layer_and_a_plain_product(toolchain):
    _build.build()  # (stand-in nvcc) every kernel in the cache
    a, w = _meta(256, 1024), _meta(1024, 1024)
    assert cm.supports(a, w.t()) is None  # nn.Linear layout
    assert cm.supports(a, w) is None  # (K, N) row-major
    assert cm.supports(_meta(2, 128, 1024), w.t(), _meta(1024), "gelu") is None  # 3-D a
    for act in ("gelu", "gelu_tanh", "silu", "relu"):
        assert cm.supports(a, w.t(), _meta(1024), act) is None


@pytest.mark.parametrize(
    "case, words",
    [
        (lambda a, w: ((a.float(), w.t().float()), {}), "bfloat16"),
        (lambda a, w: ((a, w.t()), {"residual": _meta(256, 1024)}), "residual"),
        (lambda a, w: ((a, w.t()), {"out_dtype": torch.float32}), "out_dtype"),
        (lambda a, w: ((a.t().contiguous().t(), w.t()), {}), "contiguous"),
        (lambda a, w: ((a, _meta(1024, 2048)[:, ::2]), {}), "w.t() of a contiguous"),
        (lambda a, w: ((_meta(256, 1020), _meta(1024, 1020).t()), {}), "multiples of 8"),
        (lambda a, w: ((_meta(64, 1024), w.t()), {}), "128 rows"),
        (lambda a, w: ((_meta(128, 512), _meta(512, 512).t()), {}), "2**27"),
        (lambda a, w: ((a, w.t()), {"bias": _meta(1024, dtype=torch.float32)}), "bias"),
        (lambda a, w: ((torch.empty(256, 1024, dtype=BF16), w.t()), {}), "CUDA"),
    ],
)  # fmt: skip
def test_supports_names_what_it_does_not_serve(case, words):
    args, kwargs = case(_meta(256, 1024), _meta(1024, 1024))
    reason = cm.supports(*args, **kwargs)
    assert reason is not None and words in reason, reason


def test_a_kernel_not_built_is_not_served_and_never_built_by_a_call(toolchain):
    calls, _ = toolchain
    a, w = _meta(256, 1024), _meta(1024, 1024)
    reason = cm.supports(a, w.t(), None, "silu")
    assert (
        "linear_nk_silu is not built" in reason and "python -m ryzen_opt.kernels.cutlass" in reason
    )
    assert not calls.exists()  # asking built nothing
    _build.build([("nk", "silu")])
    assert cm.supports(a, w.t(), None, "silu") is None
    assert cm.supports(a, w.t()) is not None  # another kernel: still not built


def test_layout_detection():
    w = torch.empty(24, 16)
    assert cm._layout(w.t()) == "nk"
    assert cm._layout(torch.empty(16, 24)) == "kn"
    assert cm._layout(torch.empty(16, 48)[:, ::2]) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_unavailable_without_a_gpu_and_an_explicit_call_says_why():
    assert cm.available() == "no CUDA device"
    a, b = torch.randn(4, 8, dtype=BF16), torch.randn(8, 8, dtype=BF16)
    with pytest.raises(BackendError, match="cutlass"):
        registry.dispatch("matmul", "cutlass", a, b)
    with pytest.raises(BackendError, match="no CUDA device"):
        cm.matmul(a, b)


def test_bad_arguments_are_named_before_the_backend_limits():
    with pytest.raises(ValueError, match="a's last dim"):
        cm.matmul(torch.randn(4, 8, dtype=BF16), torch.randn(9, 8, dtype=BF16))
    with pytest.raises(ValueError, match="activation"):
        cm.matmul(torch.randn(4, 8, dtype=BF16), torch.randn(8, 8, dtype=BF16), activation="tanh")


# ----------------------------------------------------------------------------- build


def test_toolchain_discovery_reports_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("NVCC", str(tmp_path / "no-nvcc"))
    assert "is not an executable" in _build.toolchain_reason()
    monkeypatch.delenv("NVCC")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_build, "DEFAULT_NVCC", str(tmp_path / "cuda" / "nvcc"))
    assert "nvcc not found" in _build.toolchain_reason()
    with pytest.raises(RuntimeError, match="nvcc not found"):
        _build.build()


def test_cutlass_headers_from_cutlass_dir(toolchain, tmp_path):
    dirs = _build.cutlass_includes()
    assert dirs[0] == str(tmp_path / "cutlass" / "include")
    assert _build.toolchain_reason() is None


def test_build_compiles_each_kernel_once_for_sm90a(toolchain):
    calls, cache = toolchain
    built = _build.build(jobs=3)
    assert len(built) == len(_build.LAYOUTS) * len(_build.ACTIVATIONS)
    assert all(p.is_file() and p.parent.parent == cache for p in built.values())
    lines = calls.read_text().splitlines()
    assert len(lines) == len(built)
    for line in lines:
        assert "-gencode=arch=compute_90a,code=sm_90a" in line and "-shared" in line
        assert f"-I{_build.CSRC}" in line
    # Cached: a second build runs no compiler; a new kernel source gives a new folder.
    _build.build()
    assert len(calls.read_text().splitlines()) == len(built)
    first = _build.cache_dir()
    _build._SOURCE, old = _build._SOURCE + "// changed\n", _build._SOURCE
    try:
        assert _build.cache_dir() != first
    finally:
        _build._SOURCE = old


def test_build_reports_the_compiler_error(toolchain, monkeypatch):
    monkeypatch.setenv("FAKE_NVCC_FAIL", "no such template")
    with pytest.raises(RuntimeError, match="no such template") as err:
        _build.build([("nk", "gelu")])
    assert "linear_nk_gelu" in str(err.value)
    assert not list(_build.cache_dir().glob("*.so"))


def test_a_failed_build_is_not_retried_in_the_process(toolchain, monkeypatch):
    calls, _ = toolchain
    monkeypatch.setenv("FAKE_NVCC_FAIL", "bad template")
    monkeypatch.setattr(_build, "_FAILED", {})
    _build.kernel.cache_clear()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="bad template"):
            _build.kernel("kn", "relu")
    assert len(calls.read_text().splitlines()) == 1  # one nvcc run for both calls
    _build.kernel.cache_clear()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"kernels": [("mn", None)]}, "pairs"),
        ({"kernels": [("nk", "tanh")]}, "activation"),
        ({"kernels": ["nk"]}, "pairs"),
        ({"jobs": 0}, "jobs"),
    ],
)
def test_build_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        _build.build(**kwargs)


def test_cli_without_a_toolchain_exits_1(tmp_path):
    env = {**os.environ, "NVCC": str(tmp_path / "none")}
    p = subprocess.run(
        [sys.executable, "-m", "ryzen_opt.kernels.cutlass"], env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert p.returncode == 1 and "not an executable" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "ryzen_opt.kernels.cutlass", "--jobs", "0"], capture_output=True,
        text=True,
    )  # fmt: skip
    assert p.returncode == 2 and "--jobs" in p.stderr


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cutlass = pytest.mark.skipif(
    not torch.cuda.is_available() or cm.available() is not None,
    reason=f"cutlass backend unavailable: {cm.available() if torch.cuda.is_available() else ''}",
)


@pytest.fixture
def poisoned():
    # Deterministic mode makes torch.empty fill floats with NaN: an output element the kernel
    # leaves unwritten shows up as NaN in assert_close_rel.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


@pytest.fixture(scope="module")
def built():
    # Every kernel at once, in parallel (one nvcc a kernel), before the tests use them.
    return _build.build()


def _ref(a, b, bias=None, activation=None):
    d = lambda t: None if t is None else t.detach().double().cpu()
    return reference.matmul(d(a), d(b), d(bias), activation)


@gpu
@needs_cutlass
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "silu", "relu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_the_float64_reference(built, poisoned, layout, activation, with_bias):
    m, n, k = 257, 1032, 520  # odd M (a partial tile), N and K multiples of 8 only
    torch.manual_seed(0)
    a = torch.randn(m, k, device="cuda", dtype=BF16)
    w = torch.randn(n, k, device="cuda", dtype=BF16) * 0.05
    b = w.t() if layout == "nk" else w.t().contiguous()
    bias = torch.randn(n, device="cuda", dtype=BF16) if with_bias else None
    assert cm.supports(a, b, bias, activation) is None
    out = cm.matmul(a, b, bias=bias, activation=activation)
    assert out.shape == (m, n) and out.dtype == BF16
    assert_close_rel(out, _ref(a, b, bias, activation), TOL[BF16], f"{layout} {activation}")


@gpu
@needs_cutlass
def test_batched_a_graph_capture_and_a_side_stream_agree(built, poisoned):
    torch.manual_seed(1)
    a = torch.randn(3, 200, 1024, device="cuda", dtype=BF16)
    w = torch.randn(2048, 1024, device="cuda", dtype=BF16) * 0.03
    bias = torch.randn(2048, device="cuda", dtype=BF16)
    eager = cm.matmul(a, w.t(), bias=bias, activation="gelu")
    assert eager.shape == (3, 200, 2048)
    assert_close_rel(eager, _ref(a, w.t(), bias, "gelu"), TOL[BF16], "3-D a")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        on_side = cm.matmul(a, w.t(), bias=bias, activation="gelu")
    side.synchronize()
    assert torch.equal(on_side, eager)
    cm.matmul(a, w.t(), bias=bias, activation="gelu")  # warm, outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = cm.matmul(a, w.t(), bias=bias, activation="gelu")
    a.copy_(torch.randn_like(a))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, cm.matmul(a, w.t(), bias=bias, activation="gelu"))


@gpu
@needs_cutlass
def test_public_matmul_with_backend_cutlass_and_its_limits(built):
    from ryzen_opt.kernels import matmul

    a = torch.randn(256, 1024, device="cuda", dtype=BF16)
    w = torch.randn(1024, 1024, device="cuda", dtype=BF16)
    out = matmul(a, w.t(), backend="cutlass")
    assert_close_rel(out, _ref(a, w.t()), TOL[BF16], "public")
    with pytest.raises(BackendError, match="128 rows"):
        matmul(a[:16], w.t(), backend="cutlass")
    with pytest.raises(BackendError, match="bfloat16"):
        matmul(a.half(), w.t().half(), backend="cutlass")


@gpu
@needs_cutlass
def test_a_repeated_signature_replays_its_plan_and_still_checks_alignment(built):
    a = torch.randn(256, 1024, device="cuda", dtype=BF16)
    w = torch.randn(1024, 1024, device="cuda", dtype=BF16)
    first = cm.matmul(a, w.t(), activation="silu")
    assert cm._plan_key(a, w.t(), None, "silu", None, None) in cm._PLANS
    assert torch.equal(cm.matmul(a, w.t(), activation="silu"), first)
    # Same shape, strides and dtype, but 2 bytes past a 16-byte boundary: refused, not run.
    buf = torch.empty(256 * 1024 + 1, device="cuda", dtype=BF16)
    shifted = buf[1:].view(256, 1024)
    shifted.copy_(a)
    with pytest.raises(BackendError, match="16-byte aligned"):
        cm.matmul(shifted, w.t(), activation="silu")


def test_plan_keys_only_for_plain_tensors():
    a, b = torch.randn(4, 8), torch.randn(8, 8)
    assert cm._plan_key(a, b, None, None, None, None) is not None
    assert cm._plan_key([1], b, None, None, None, None) is None
    assert cm._plan_key(a, b, torch.nn.Parameter(torch.randn(8)), None, None, None) is not None

    class Sub(torch.Tensor):
        pass

    assert cm._plan_key(a, b.as_subclass(Sub), None, None, None, None) is None
