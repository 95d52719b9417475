"""Numba CPU matmul against the float64 reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from ryzen_opt.kernels import BackendError, reference  # noqa: E402
from ryzen_opt.kernels import matmul as public_matmul  # noqa: E402
from ryzen_opt.kernels.numba import matmul as nm  # noqa: E402
from ryzen_opt.kernels.numba._common import ROWS_NR, VW  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402
from tests.kernels.numba_drivers import force_driver  # noqa: E402

# The kernel reassociates sums (8-wide partial dot products), so DESIGN allows fp32 1e-4; the
# measured error is <= 2e-7 on every shape here, so the stricter 1e-5 is used to catch bugs.
TOL_MM = TOL["fp32_exact"]
ACTS = [None, "gelu", "gelu_tanh", "silu", "relu"]


@pytest.fixture(autouse=True)
def _poison():
    # Deterministic mode fills torch.empty with NaN: an output element the kernel leaves
    # unwritten shows up as NaN in assert_close_rel.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _ref(a, b, bias=None, activation=None, residual=None):
    d = lambda t: None if t is None else t.detach().double()
    return reference.matmul(d(a), d(b), d(bias), activation, d(residual))


# 1, primes, and non-multiples of the 3x3 tile, the 1x4 skinny tile, MB=NB=96 and KC=256.
@pytest.mark.parametrize(
    "m,k,n",
    [
        (1, 1, 1),
        (1, 257, 13),
        (2, 7, 5),
        (3, 3, 3),
        (5, 97, 1),
        (16, 300, 101),
        (97, 513, 98),
        (193, 31, 190),
    ],
)
def test_matmul_matches_reference_on_odd_shapes(m, k, n):
    a, b = torch.randn(m, k), torch.randn(k, n)
    assert_close_rel(nm.matmul(a, b), _ref(a, b), TOL_MM, f"{m}x{k}x{n}")


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("m", [1, 37])
def test_matmul_fused_epilogue_matches_reference(activation, m):
    a, b = torch.randn(m, 70), torch.randn(70, 101)
    bias, res = torch.randn(101), torch.randn(m, 101)
    out = nm.matmul(a, b, bias=bias, activation=activation, residual=res)
    assert_close_rel(out, _ref(a, b, bias, activation, res), TOL_MM, str(activation))
    out = nm.matmul(a * 4, b, activation=activation)  # wide range: the erf/exp tails
    assert_close_rel(out, _ref(a * 4, b, None, activation), TOL_MM, f"{activation} no bias")


@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_serial_and_parallel_paths_agree_with_reference(threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)  # 1 thread: the serial kernel; 2: the prange kernel
    try:
        a, b = torch.randn(130, 200), torch.randn(200, 70)
        bias = torch.randn(70)
        out = nm.matmul(a, b, bias, "gelu")
        assert_close_rel(out, _ref(a, b, bias, "gelu"), TOL_MM, f"{threads} threads")
    finally:
        torch.set_num_threads(prev)


def test_matmul_batched_and_broadcast_batch():
    a, b = torch.randn(3, 10, 20), torch.randn(3, 20, 7)
    assert_close_rel(nm.matmul(a, b), _ref(a, b), TOL_MM, "3-D @ 3-D")
    b2 = torch.randn(20, 7)
    assert_close_rel(nm.matmul(a, b2), _ref(a, b2), TOL_MM, "3-D @ 2-D")
    a1 = torch.randn(1, 10, 20)
    assert_close_rel(nm.matmul(a1, b), _ref(a1, b), TOL_MM, "batch 1 broadcast")
    for a, b in (
        (torch.randn(2, 30, 40), torch.randn(40, 20)),  # packed path, shared b
        (torch.randn(1, 30, 40), torch.randn(2, 40, 20)),
    ):
        assert_close_rel(nm.matmul(a, b), _ref(a, b), TOL_MM, f"{a.shape} @ {b.shape}")
    a, b = torch.randn(3, 10, 20), torch.randn(3, 20, 7)
    res = torch.randn(3, 10, 7)
    out = nm.matmul(a, b, torch.randn(7), "silu", res)
    assert out.shape == (3, 10, 7)


def test_matmul_non_contiguous_inputs():
    a = torch.randn(40, 30)[::2, 1::2]  # (20, 15), strided both ways
    w = torch.randn(11, 15)  # nn.Linear weight: b = w.t() is served without a copy
    assert_close_rel(nm.matmul(a, w.t()), _ref(a, w.t()), TOL_MM, "strided a @ w.t()")
    b = torch.randn(15, 22)[:, ::2]
    assert_close_rel(nm.matmul(a.t().contiguous().t(), b), _ref(a, b), TOL_MM, "column-major a")


def test_matmul_empty_inputs():
    assert nm.matmul(torch.randn(0, 5), torch.randn(5, 3)).shape == (0, 3)
    assert nm.matmul(torch.randn(4, 5), torch.randn(5, 0)).shape == (4, 0)
    for m in (4, 30):  # the dot-product path and the packed path
        out = nm.matmul(torch.randn(m, 0), torch.randn(0, 3), bias=torch.ones(3))
        assert torch.equal(out, torch.ones(m, 3))


def test_matmul_out_dtype_and_public_dispatch():
    a, b = torch.randn(6, 9), torch.randn(9, 4)
    out = public_matmul(a, b, out_dtype=torch.float64, backend="numba")
    assert out.dtype == torch.float64
    assert_close_rel(out, _ref(a, b), TOL_MM, "public backend=numba")


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 70),
    k=st.integers(1, 300),
    n=st.integers(1, 70),
    batch=st.sampled_from([0, 1, 3]),
    transpose_b=st.booleans(),
    activation=st.sampled_from(ACTS),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_property_matches_reference(m, k, n, batch, transpose_b, activation, bias, seed):
    torch.manual_seed(seed)  # the data are part of the example: shrinking and replay see them
    lead = (batch,) if batch else ()
    a = torch.randn(*lead, m, k)
    b = torch.randn(*lead, n, k).transpose(-1, -2) if transpose_b else torch.randn(*lead, k, n)
    bi = torch.randn(n) if bias else None
    out = nm.matmul(a, b, bi, activation)
    ref = _ref(a, b, bi, activation)
    assert_close_rel(out, ref, TOL_MM, f"{a.shape}@{b.shape}", reduction=k)


def test_matmul_bad_input_raises_naming_argument():
    with pytest.raises(ValueError, match="a's last dim"):
        nm.matmul(torch.randn(3, 4), torch.randn(5, 2))
    with pytest.raises(ValueError, match="bias"):
        nm.matmul(torch.randn(3, 4), torch.randn(4, 2), bias=torch.randn(3))
    with pytest.raises(ValueError, match="activation"):
        nm.matmul(torch.randn(3, 4), torch.randn(4, 2), activation="tanh")
    with pytest.raises(TypeError, match="b must be a torch.Tensor"):
        nm.matmul(torch.randn(3, 4), [[1.0]])


def test_matmul_unsupported_dtype_raises_backend_error():
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(BackendError, match="float32"):
        public_matmul(a, b, backend="numba")
    with pytest.raises(BackendError, match="float32"):
        public_matmul(a.bfloat16(), b.bfloat16(), backend="numba")
    # auto falls back to the reference instead
    assert_close_rel(public_matmul(a, b), _ref(a, b), 1e-12, "auto fallback")


def test_micro_kernels_compile_to_packed_fma():
    # A fresh, uncached compile (a cache hit carries no assembly to inspect). The 3x3 dot
    # kernel at 58 GFLOP/s per core vs 2.5 for a scalar build: losing vectorization (e.g. a
    # flag change that adds a per-iteration check) must fail here, not in a benchmark.
    import re

    import numpy as np
    from numba import njit

    from ryzen_opt.kernels.numba import _common

    flags = {k: v for k, v in _common.JIT.items() if k != "cache"}
    row = "float32[::1]"
    dot = njit(f"UniTuple(float32, 9)({', '.join([row] * 6)}, int64)", **flags)(
        _common._dot3x3.py_func
    )
    asm = next(iter(dot.inspect_asm().values()))
    assert re.search(r"vfmadd\d+ps\s+.*%[yz]mm", asm), "3x3 dot kernel is not vectorized"

    def act_loop(x, act):
        for j in range(x.shape[0]):
            x[j] = _common._activate(x[j], act)

    loop = njit("void(float32[::1], int64)", **flags)(act_loop)
    asm = next(iter(loop.inspect_asm().values()))
    assert re.search(r"vfmadd\d+ps\s+.*%[yz]mm", asm), "epilogue activations are not vectorized"
    x = np.linspace(-5, 5, 64, dtype=np.float32)
    loop(x, 1)
    assert np.isfinite(x).all()


@pytest.fixture(params=["serial", "threaded"])
def rows_driver(request, monkeypatch):
    """The decode-size (row-tile) path on the calling thread or on the pool."""
    yield from force_driver(request.param, monkeypatch, nm, "ROWS_SERIAL_FMAS")


# Rows 1..23 (the row-tile path), primes, columns off the ROWS_NR-wide panel (the ragged
# last panel: its whole vectors two and one at a time, then a tail; fewer columns than one
# panel), K = 1.
@pytest.mark.parametrize(
    "m,k,n",
    [
        (1, 256, 768),
        (16, 256, 768),
        (23, 97, 2 * ROWS_NR + 5),
        (5, 37, ROWS_NR + 3 * VW + 3),
        (16, 64, 2 * VW),
        (7, 19, VW),
        (3, 1, 7),
        (7, 13, ROWS_NR),
        (2, 300, 1),
    ],
)
def test_matmul_row_tile_path_matches_reference(rows_driver, m, k, n):
    a, b = torch.randn(m, k), torch.randn(k, n)
    assert_close_rel(nm.matmul(a, b), _ref(a, b), TOL_MM, f"{rows_driver} {m}x{k}x{n}")


def test_matmul_row_tile_path_reads_views_in_place(rows_driver):
    # Rows of a and b further apart than their lengths (slices of wider matrices), an offset
    # start, and a whose columns are strided (copied first).
    wide_a, wide_b = torch.randn(9, 300), torch.randn(130, 2 * ROWS_NR + 40)
    a, b = wide_a[1:, 5:133], wide_b[2:, 3 : 3 + ROWS_NR + 9]
    assert_close_rel(nm.matmul(a, b), _ref(a, b), TOL_MM, f"{rows_driver} views")
    a2 = torch.randn(5, 256)[:, ::2]
    assert_close_rel(nm.matmul(a2, b), _ref(a2, b), TOL_MM, f"{rows_driver} strided a")


@pytest.mark.parametrize("activation", ACTS)
def test_matmul_row_tile_path_fused_epilogue(rows_driver, activation):
    m, k, n = 5, 64, ROWS_NR + 3
    a, b = torch.randn(m, k), torch.randn(k, n)
    bias, res = torch.randn(n), torch.randn(m, n)
    out = nm.matmul(a, b, bias=bias, activation=activation, residual=res)
    assert_close_rel(out, _ref(a, b, bias, activation, res), TOL_MM, str(activation))
    out = nm.matmul(a, b, residual=res.double(), out_dtype=torch.float64)
    assert out.dtype == torch.float64
    assert_close_rel(out, _ref(a, b, None, None, res), TOL_MM, "float64 residual")


def test_matmul_row_tile_output_is_fresh_per_call():
    a, b = torch.randn(2, 40), torch.randn(40, 50)
    first = nm.matmul(a, b)
    keep = first.clone()
    second = nm.matmul(a * 3, b)
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, keep)


@pytest.mark.parametrize("vw", [8, 16])
@pytest.mark.parametrize("mr", [1, 2, 4])
def test_rows_tile_intrinsic_at_both_vector_widths(vw, mr):
    # Both widths compile on any x86 host (LLVM splits 16-wide vectors without AVX-512), so
    # the AVX2 tiling is checked on an AVX-512 machine and the other way round.
    from numba import njit

    from ryzen_opt.kernels.numba._common import _make_rows_tile

    tile = _make_rows_tile(mr, 2, vw)

    @njit
    def run(a, lda, b, ldb, k, c, ldc):
        tile(a, 1, lda, b, 2, ldb, k, c, 3, ldc)

    k, lda, ldb, ldc, nr = 37, 41, 2 * vw + 5, 2 * vw + 7, 2 * vw
    a = torch.randn(mr * lda + 1).numpy()
    b = torch.randn(k * ldb + 2).numpy()
    c = torch.zeros(mr * ldc + 3).numpy()
    run(a, lda, b, ldb, k, c, ldc)
    for i in range(mr):
        ai = torch.from_numpy(a[1 + i * lda : 1 + i * lda + k]).double()
        bm = torch.from_numpy(b[2:]).double()[: k * ldb].reshape(k, ldb)[:, :nr]
        got = torch.from_numpy(c[3 + i * ldc : 3 + i * ldc + nr])
        assert_close_rel(got, ai @ bm, TOL_MM, f"row {i}")


def test_matmul_row_tile_output_is_float32_whatever_the_default_dtype():
    a, b = torch.randn(3, 20), torch.randn(20, 9)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = nm.matmul(a, b)
    finally:
        torch.set_default_dtype(prev)
    assert out.dtype == torch.float32
    assert_close_rel(out, _ref(a, b), TOL_MM, "default float64")


_AVX2_SCRIPT = """
import torch
from ryzen_opt.kernels import reference
from ryzen_opt.kernels.numba import _common
from ryzen_opt.kernels.numba.attention import attention
from ryzen_opt.kernels.numba.decode_attention import decode_attention
from ryzen_opt.kernels.numba.matmul import matmul

assert _common.VW == 8 and _common.GEMM_NR == 16, (_common.VW, _common.GEMM_NR)
torch.manual_seed(0)
for m in (1, 2, 3, 7, 30):  # 30 rows: the packed GEMM tile

    for n in (2 * _common.ROWS_NR + 5, _common.ROWS_NR + 3 * 8 + 3):  # a ragged panel's tiles
        a, b = torch.randn(m, 50), torch.randn(50, n)
        ref = a.double() @ b.double()
        err = float((matmul(a, b).double() - ref).norm() / ref.norm())
        assert err <= 1e-5, ("matmul", m, n, err)
    w = torch.randn(21, 53)  # b = w.t(): the 8-lane dot tiles, a K tail, a ragged block
    a = torch.randn(m, 53)
    ref = a.double() @ w.double().t()
    err = float((matmul(a, w.t()).double() - ref).norm() / ref.norm())
    assert err <= 1e-5, ("matmul w.t()", m, err)
q, k, v = torch.randn(2, 4, 72), torch.randn(2, 2, 33, 72), torch.randn(2, 2, 33, 72)
cl = torch.tensor([33, 5])
ref = reference.decode_attention(q.double(), k.double(), v.double(), cl)
err = float((decode_attention(q, k, v, cl).double() - ref).norm() / ref.norm())
assert err <= 1e-5, ("decode", err)
q, k, v = torch.randn(1, 2, 37, 24), torch.randn(1, 2, 41, 24), torch.randn(1, 2, 41, 24)
ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
err = float((attention(q, k, v, causal=True).double() - ref).norm() / ref.norm())
assert err <= 1e-5, ("attention", err)
print("ok")
"""


def test_avx2_tiling_matches_reference_in_a_haswell_target_process():
    # The kernels pick 8 or 16 lanes from numba's target. Compiling for haswell (AVX2 + FMA,
    # which every AVX-512 host also runs) checks the 8-lane row tiles, decode intrinsics and
    # the 16-wide packed GEMM tile (matmul, attention) on any x86 machine. ~14 s the first
    # time (compilation), ~2 s from numba's cache.
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("haswell is an x86 target")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "PYTHONPATH": str(root)}
    env.pop("NUMBA_CPU_FEATURES", None)
    run = subprocess.run(
        [sys.executable, "-c", _AVX2_SCRIPT], cwd=root, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


@pytest.mark.parametrize(
    "m,k,n", [(1, 256, 768), (16, 256, 768), (23, 97, 21), (3, 1, 7), (2, 300, 1)]
)
def test_matmul_weight_rows_path_matches_reference(rows_driver, m, k, n):
    # b = W.t() with W (n, k) row-major: the nn.Linear layout, W's rows read in place; W's
    # rows further apart than k (a slice of a wider matrix) and an offset start.
    a = torch.randn(m, k)
    w = torch.randn(n + 1, k + 3)[1:, 2 : 2 + k]
    assert_close_rel(nm.matmul(a, w.t()), _ref(a, w.t()), TOL_MM, f"{rows_driver} {m}x{k}x{n}")


@pytest.mark.parametrize("activation", [None, "gelu", "silu"])
def test_matmul_weight_rows_path_with_epilogue(rows_driver, activation):
    m, k, n = 4, 40, 19
    a, w = torch.randn(m, k), torch.randn(n, k)
    bias, res = torch.randn(n), torch.randn(m, n)
    out = nm.matmul(a, w.t(), bias=bias, activation=activation, residual=res)
    assert_close_rel(out, _ref(a, w.t(), bias, activation, res), TOL_MM, str(activation))


# Every row count of the decode-size path (whole WROWS_MR tiles and each remainder), K and N
# off the vector width and off the 8-row weight block, K below one vector.
@pytest.mark.parametrize("m", range(1, 18))
@pytest.mark.parametrize("k,n", [(37, 29), (8, 16), (256, 768)])
def test_matmul_weight_rows_dot_tiles_on_odd_shapes(rows_driver, m, k, n):
    a = torch.randn(m + 2, k + 5)[1:-1, 3 : 3 + k]  # rows k + 5 apart, offset start
    w = torch.randn(n, k)
    got = nm.matmul(a, w.t())
    assert_close_rel(got, _ref(a, w.t()), TOL_MM, f"{rows_driver} {m}x{k}x{n}")


@pytest.mark.parametrize("vw", [8, 16])
@pytest.mark.parametrize("mr", [1, 2, 3])
def test_dots_tile_intrinsic_at_both_vector_widths(vw, mr):
    # Both widths compile on any x86 host, as for the row tiles above.
    from numba import njit

    from ryzen_opt.kernels.numba._dots_tile import _make_dots_tile

    tile = _make_dots_tile(mr, vw)

    @njit
    def run(x, ldx, w, ldw, k, c, ldc):
        tile(x, 1, ldx, w, 2, ldw, k, c, 3, ldc)

    k, ldx, ldw, ldc = 3 * vw, 3 * vw + 5, 3 * vw + 3, 11
    x = torch.randn(mr * ldx + 1).numpy()
    w = torch.randn(8 * ldw + 2).numpy()
    c = torch.full((mr * ldc + 3,), float("nan")).numpy()
    run(x, ldx, w, ldw, k, c, ldc)
    wm = torch.from_numpy(w[2:]).double()[: 8 * ldw].reshape(8, ldw)[:, :k]
    for i in range(mr):
        xi = torch.from_numpy(x[1 + i * ldx : 1 + i * ldx + k]).double()
        got = torch.from_numpy(c[3 + i * ldc : 3 + i * ldc + 8])
        assert_close_rel(got, wm @ xi, TOL_MM, f"row {i}")


# The fast path also takes a contiguous float32 bias and an activation (no residual): both
# layouts of b, rows around the tile sizes, N off every block width.
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("m", [1, 2, 4, 5, 16, 17])
@pytest.mark.parametrize("activation", ACTS)
def test_matmul_decode_path_bias_and_activation(rows_driver, transpose_b, m, activation):
    k, n = 37, ROWS_NR + 11
    a = torch.randn(m, k)
    b = torch.randn(n, k).t() if transpose_b else torch.randn(k, n)
    bias = torch.randn(n)
    out = nm.matmul(a, b, bias=bias, activation=activation)
    ref = _ref(a, b, bias, activation)
    assert_close_rel(out, ref, TOL_MM, f"{rows_driver} {m} {activation} {transpose_b}")


def test_matmul_decode_path_bias_it_cannot_read_in_place():
    # float64, strided or broadcast biases take the full path (converted there); a bias of the
    # wrong shape or type, or an unknown activation, still raises naming the argument.
    a, w = torch.randn(3, 20), torch.randn(9, 20)
    for bias in (
        torch.randn(9, dtype=torch.float64),
        torch.randn(18)[::2],
        torch.randn(1).expand(9),
    ):
        assert_close_rel(
            nm.matmul(a, w.t(), bias), _ref(a, w.t(), bias), TOL_MM, str(bias.stride())
        )
    with pytest.raises(ValueError, match="bias"):
        nm.matmul(a, w.t(), bias=torch.randn(8))
    with pytest.raises(ValueError, match="bias"):
        nm.matmul(a, w.t(), bias=torch.tensor(1.0))
    with pytest.raises(TypeError, match="bias"):
        nm.matmul(a, w.t(), bias=[0.0] * 9)
    with pytest.raises(ValueError, match="activation"):
        nm.matmul(a, w.t(), activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        nm.matmul(a, w.t(), activation=["gelu"])


def test_decode_path_thread_rule_counts_one_row_as_two():
    """One row goes to the pool from a 2**17-element weight (1 x 256 x 768: each thread
    reads half the weight from its own L2); more rows from 2**18 FMAs; never with one thread
    or one block of columns."""
    from ryzen_opt.kernels.numba._matmul_rows import _use_threads

    s = nm.ROWS_SERIAL_FMAS
    assert _use_threads(2, 1, 768, 256, s, 8)
    assert _use_threads(2, 1, 512, 256, s, 6)
    assert not _use_threads(2, 1, 256, 256, s, 3)
    assert not _use_threads(2, 4, 256, 128, s, 3)
    assert _use_threads(2, 4, 256, 256, s, 3)
    assert _use_threads(2, 16, 768, 256, s, 8)
    assert not _use_threads(1, 1, 768, 256, s, 8)
    assert not _use_threads(2, 16, 768, 256, s, 1)
