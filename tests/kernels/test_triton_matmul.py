"""Triton matmul against the float64 reference (interpreter on CPU, kernels on a GPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from ryzen_opt.kernels import BackendError, reference  # noqa: E402
from ryzen_opt.kernels import matmul as public_matmul  # noqa: E402
from ryzen_opt.kernels.triton import matmul as tm  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _poison_and_tf32():
    # Deterministic mode makes torch.empty fill floats with NaN: every output element the
    # kernel leaves unwritten shows up as NaN in assert_close_rel.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _tol(dtype):
    return TOL["tf32"] if dtype == torch.float32 else TOL[dtype]


def _ref(a, b, bias=None, activation=None, residual=None):
    d = lambda t: None if t is None else t.detach().double().cpu()
    return reference.matmul(d(a), d(b), d(bias), activation, d(residual))


def _rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def test_outputs_are_poisoned_before_each_run():
    assert torch.empty(8, device=DEVICE).isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k", [(1, 17, 113), (17, 113, 255), (113, 1, 17), (255, 17, 1)])
def test_matmul_matches_reference_on_odd_shapes(m, n, k, dtype):
    a, b = _rand(m, k, dtype=dtype), _rand(k, n, dtype=dtype)
    assert_close_rel(tm.matmul(a, b), _ref(a, b), _tol(dtype), f"{m}x{n}x{k} {dtype}")


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "silu", "relu"])
def test_matmul_fused_epilogue_matches_reference(activation):
    a, b = _rand(33, 40), _rand(40, 47)
    bias, res = _rand(47), _rand(33, 47)
    out = tm.matmul(a, b, bias=bias, activation=activation, residual=res)
    assert_close_rel(out, _ref(a, b, bias, activation, res), TOL[torch.bfloat16], str(activation))


def test_matmul_output_cast_and_mixed_dtype_epilogue():
    a, b = _rand(19, 64, dtype=torch.float16), _rand(64, 21, dtype=torch.float16)
    bias = _rand(21, dtype=torch.float32)
    out = tm.matmul(a, b, bias=bias, activation="silu", out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_close_rel(out, _ref(a, b, bias, "silu"), TOL[torch.float16])


def test_matmul_strided_transposed_and_batched_inputs():
    at = _rand(40, 33).t()  # (33, 40) with stride (1, 40)
    bt = _rand(17, 40).t()
    assert_close_rel(tm.matmul(at, bt), _ref(at, bt), TOL[torch.bfloat16], "transposed")
    a_sl = _rand(33, 80)[:, ::2]  # column stride 2
    assert_close_rel(tm.matmul(a_sl, bt), _ref(a_sl, bt), TOL[torch.bfloat16], "sliced")
    a3, b3, b2 = _rand(3, 17, 40), _rand(3, 40, 9), _rand(40, 9)
    res3 = _rand(3, 17, 9)
    assert_close_rel(
        tm.matmul(a3, b3, residual=res3), _ref(a3, b3, residual=res3), TOL[torch.bfloat16], "3d@3d"
    )
    assert_close_rel(tm.matmul(a3, b2), _ref(a3, b2), TOL[torch.bfloat16], "3d@2d")
    a2 = _rand(17, 40)
    assert_close_rel(tm.matmul(a2, b3), _ref(a2, b3), TOL[torch.bfloat16], "2d@3d")
    a1 = _rand(1, 17, 40)
    assert_close_rel(tm.matmul(a1, b3), _ref(a1, b3), TOL[torch.bfloat16], "broadcast batch")


@pytest.mark.parametrize("m", [1, 5, 64])
def test_matmul_skinny_split_k_matches_reference(m):
    k, n = 1024, 96
    assert tm._split_k(m, n, k, 1, tm._common.num_sms(0)) > 1, "shape must take split-K"
    a, b, bias = _rand(m, k), _rand(k, n), _rand(n)
    res = _rand(m, n)
    out = tm.matmul(a, b, bias=bias, activation="gelu", residual=res)
    assert_close_rel(out, _ref(a, b, bias, "gelu", res), TOL[torch.bfloat16], f"M={m}")


@pytest.mark.parametrize("m", [1, 5, 64])
def test_matmul_split_k_one_and_two_pass_agree_bitwise(m, monkeypatch):
    # Both sum the fp32 partials in split order, so the two launches' result (the choice
    # under CUDA-graph capture) is the one launch's (eager calls), bit for bit.
    k, n = 1024, 96
    a, b, bias, res = _rand(m, k), _rand(k, n), _rand(n), _rand(m, n)
    outs = []
    for one_pass in (False, True):
        monkeypatch.setattr(tm, "_split_k_one_pass", lambda device, flag=one_pass: flag)
        outs.append(tm.matmul(a, b, bias=bias, activation="gelu_tanh", residual=res))
    assert torch.equal(outs[0], outs[1])
    assert_close_rel(outs[0], _ref(a, b, bias, "gelu_tanh", res), TOL[torch.bfloat16])


def test_matmul_split_k_batched_leaves_tile_counters_zeroed(monkeypatch):
    # The last program of each tile re-zeroes its counter: a second call (and every later
    # one) starts from zero, or it would skip or double a tile's reduction. 132 SMs as on an
    # H100/H200 (the interpreter's 4 would leave this batch of 3 tiles unsplit).
    monkeypatch.setattr(tm._common, "num_sms", lambda index: 132)
    a, b = _rand(3, 2, 1024), _rand(3, 1024, 96)
    assert tm._split_k(2, 96, 1024, 3, tm._common.num_sms(0)) > 1, "shape must take split-K"
    for _ in range(2):
        assert_close_rel(tm.matmul(a, b), _ref(a, b), TOL[torch.bfloat16], "batched split-K")
    counters = [b for k, b in tm._common._SCRATCH.items() if k[0] == "splitk_counters"]
    assert counters
    for kept in counters:
        assert int(kept.count_nonzero()) == 0


def test_matmul_persistent_variant_matches_reference():
    a, b, bias = _rand(100, 70), _rand(70, 90), _rand(90)
    cfg = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "PERSISTENT": True}
    out = tm._launch(a, b, bias, "relu", None, None, config=cfg)
    assert_close_rel(out, _ref(a, b, bias, "relu"), TOL[torch.bfloat16])


def test_matmul_empty_and_zero_k():
    assert tm.matmul(_rand(0, 8), _rand(8, 5)).shape == (0, 5)
    bias = _rand(5)
    out = tm.matmul(_rand(3, 0), _rand(0, 5), bias=bias)
    assert_close_rel(out, _ref(_rand(3, 0), _rand(0, 5), bias), TOL[torch.bfloat16])


@settings(max_examples=8, deadline=None)
@given(
    m=st.integers(1, 70),
    n=st.integers(1, 70),
    k=st.integers(1, 70),
    ta=st.booleans(),
    tb=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_property_shapes_and_layouts(m, n, k, ta, tb, seed):
    torch.manual_seed(seed)
    a = _rand(k, m).t() if ta else _rand(m, k)
    b = _rand(n, k).t() if tb else _rand(k, n)
    out, ref = tm.matmul(a, b), _ref(a, b)
    assert_close_rel(out, ref, TOL[torch.bfloat16], f"{m}x{n}x{k}", reduction=k)


def test_matmul_fp32_without_tf32_is_refused():
    torch.backends.cuda.matmul.allow_tf32 = False  # the fixture restores it
    a, b = _rand(4, 4, dtype=torch.float32), _rand(4, 4, dtype=torch.float32)
    assert "allow_tf32" in tm.supports(a, b)
    with pytest.raises(TypeError, match="allow_tf32"):
        tm.matmul(a, b)
    with pytest.raises(BackendError, match="allow_tf32"):
        public_matmul(a, b, backend="triton")


def test_matmul_rejects_bad_input_naming_the_argument():
    a = _rand(4, 8)
    with pytest.raises(ValueError, match="a's last dim"):
        tm.matmul(a, _rand(7, 3))
    with pytest.raises(TypeError, match="share a dtype"):
        tm.matmul(a, _rand(8, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match="float64"):
        tm.matmul(a.double(), _rand(8, 3).double())
    with pytest.raises(ValueError, match="bias must have shape"):
        tm.matmul(a, _rand(8, 3), bias=_rand(4))
    meta = torch.empty(4, 8, device="meta", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="a is on meta"):
        tm.matmul(meta, torch.empty(8, 3, device="meta", dtype=torch.bfloat16))


@pytest.mark.gpu
def test_matmul_rejects_cpu_tensors_on_a_gpu_machine():
    with pytest.raises(ValueError, match="a is on cpu"):
        tm.matmul(torch.randn(4, 8), torch.randn(8, 3))
    assert "CUDA" in tm.supports(torch.randn(4, 8), torch.randn(8, 3))


def test_matmul_dispatches_through_the_registry():
    a, b = _rand(9, 16), _rand(16, 11)
    out = public_matmul(a, b, activation="relu", backend="triton")
    assert_close_rel(out, _ref(a, b, activation="relu"), TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(4096, 4096, 4096), (1000, 3000, 777), (8, 11008, 4096)])
def test_matmul_gpu_sizes_match_reference(m, n, k):
    w = _rand(n, k)  # nn.Linear layout: b = w.t()
    a, bias = _rand(m, k), _rand(n)
    out = tm.matmul(a, w.t(), bias=bias, activation="gelu")
    assert_close_rel(out, _ref(a, w.t(), bias, "gelu"), TOL[torch.bfloat16], f"{m}x{n}x{k}")


@pytest.mark.gpu
def test_matmul_gpu_persistent_config_matches_reference():
    a, b = _rand(2048, 1536), _rand(1536, 3000)
    cfg = {
        "BLOCK_M": 128,
        "BLOCK_N": 256,
        "BLOCK_K": 64,
        "GROUP_M": 8,
        "PERSISTENT": True,
        "num_warps": 8,
        "num_stages": 3,
    }
    out = tm._launch(a, b, None, "silu", None, None, config=cfg)
    assert_close_rel(out, _ref(a, b, activation="silu"), TOL[torch.bfloat16])


# The TMA kernel (sm_90+; on the CPU through the interpreter when asked with tma=True).


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m,n,k", [(1, 8, 8), (70, 96, 80), (33, 40, 104), (130, 200, 72)])
@pytest.mark.parametrize("nn_linear", [True, False])
def test_matmul_tma_kernel_matches_reference(m, n, k, dtype, nn_linear):
    # Tiles past M, N and K: the descriptors' bounds read zeros and drop the stores.
    a, w = _rand(m, k, dtype=dtype), _rand(n, k, dtype=dtype)
    b = w.t() if nn_linear else w.t().contiguous()
    bias, res = _rand(n, dtype=dtype), _rand(m, n, dtype=dtype)
    out = tm._launch(a, b, bias, "gelu", res, None, tma=True)
    assert_close_rel(out, _ref(a, b, bias, "gelu", res), TOL[dtype])
    plain = tm._launch(a, b, None, None, None, torch.float32, tma=True)
    assert plain.dtype == torch.float32
    assert_close_rel(plain, _ref(a, b), TOL[dtype])


@pytest.mark.parametrize("programs_per_sm", [1, 2])
def test_matmul_tma_every_config_and_program_count_matches_reference(programs_per_sm):
    # Each autotune candidate launched alone, with one or two programs an SM striding over
    # the tiles (the grid, not the config, sets the stride).
    m, n, k = (72, 200, 136) if tm._common.INTERPRET else (1000, 3000, 776)
    a, w, bias = _rand(m, k), _rand(n, k) * 0.05, _rand(n)
    ref = _ref(a, w.t(), bias, "gelu")
    sms = tm._common.num_sms(0)
    keys = [tm._common.pow2_bucket(v) for v in (m, n, k)]
    for cfg in tm._tma_configs():
        meta = {**cfg.kwargs, "PER_SM": programs_per_sm}
        tiles = tm._common.cdiv(m, meta["BLOCK_M"]) * tm._common.cdiv(n, meta["BLOCK_N"])
        c = torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16)
        tm._ensure_tma_allocator()
        tm._matmul_tma_kernel.fn[(min(programs_per_sm * sms, tiles),)](
            a, w.t(), c, bias, c, m, n, k, *keys,
            a.stride(0), w.stride(0), c.stride(0), 1, 0, 0,
            HAS_BIAS=True, ACTIVATION=tm._ACTIVATION_CODE["gelu"], HAS_RESIDUAL=False,
            B_KN=False, UPCAST=tm._common.upcast_dot(a.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
        )
        assert_close_rel(c, ref, TOL[torch.bfloat16], str(meta))


def test_matmul_tma_layout_rules():
    a, w = _rand(64, 128), _rand(96, 128)
    c = torch.empty(64, 96, device=DEVICE, dtype=torch.bfloat16)
    assert tm._tma_layout(a, w.t(), c, 1) == 0  # nn.Linear: W's rows are B's columns
    assert tm._tma_layout(a, w.t().contiguous(), c, 1) == 1
    assert tm._tma_layout(a.float(), w.t().float(), c.float(), 1) is None  # TF32 stays off
    assert tm._tma_layout(a[:, 1:], w[:, 1:].t(), c, 1) is None  # rows not 16-byte aligned
    assert tm._tma_layout(a.t().contiguous().t(), w.t(), c, 1) is None  # A column-major
    assert tm._tma_layout(a, w.t(), c, 2) is None  # batched
    odd = _rand(64, 100)  # 200-byte rows
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        tm._launch(odd, _rand(100, 8), None, None, None, None, tma=True)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(2048, 4096, 4096), (1000, 3000, 776), (520, 5504, 1024)])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_matmul_gpu_tma_path_is_taken_and_matches_reference(m, n, k, activation):
    a = _rand(m, k)
    w = _rand(n, k) * 0.05
    bias = _rand(n)
    calls = tm._launch_tma.hits + tm._launch_tma.misses
    out = tm.matmul(a, w.t(), bias=bias, activation=activation)
    assert tm._launch_tma.hits + tm._launch_tma.misses == calls + 1  # the TMA kernel ran
    assert_close_rel(out, _ref(a, w.t(), bias, activation), TOL[torch.bfloat16])
    again = tm.matmul(a, w.t(), bias=bias, activation=activation)  # an eager plan's replay
    assert torch.equal(again, out)
    pointer = tm._launch(a, w.t(), bias, activation, None, None, tma=False)
    assert_close_rel(pointer, _ref(a, w.t(), bias, activation), TOL[torch.bfloat16])


@pytest.mark.gpu
def test_matmul_gpu_tma_path_in_a_new_thread_and_a_graph():
    # The descriptors' allocator is per thread context; a graph capture allocates from its pool.
    import threading

    a, w = _rand(512, 1024), _rand(2048, 1024)
    ref = _ref(a, w.t())
    outs = []
    thread = threading.Thread(target=lambda: outs.append(tm.matmul(a, w.t())))
    thread.start()
    thread.join()
    assert_close_rel(outs[0], ref, TOL[torch.bfloat16])
    tm.matmul(a, w.t())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tm.matmul(a, w.t())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, outs[0])


@pytest.mark.parametrize(
    "m,n,k,split",
    [
        (1, 4096, 4096, 8),  # M=1: ~one wave of 256-wide tiles
        (1, 11008, 4096, 1),  # 86 tiles 128 wide cover half of 132 SMs: no split
        (1, 5504, 4096, 4),  # 43 tiles 128 wide: splits for 22 tiles 256 wide
        (1, 32000, 4096, 1),
        (2, 11008, 4096, 1),  # 86 tiles 128 wide: no split
        (16, 11008, 4096, 1),
        (64, 11008, 4096, 1),
        (64, 4096, 11008, 4),
        (64, 4096, 256, 1),  # K < 512: never split
        (65, 4096, 4096, 1),  # not skinny
        (2, 96, 1024, 4),
        (3, 2752, 4096, 4),
    ],
)
def test_split_k_rule(m, n, k, split):
    assert tm._split_k(m, n, k, 1, 132) == split


def test_skinny_fixed_tile_paths_match_reference(monkeypatch):
    # The fixed skinny tile (sm_90+ only) through the split-K kernel without its autotuner,
    # one and two passes, and through the pointer kernel when there is no split.
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "PERSISTENT": False,
           "num_warps": 4, "num_stages": 1 if tm._common.INTERPRET else 3}
    monkeypatch.setattr(tm, "_skinny_config", lambda m, k, elt, dev, split: dict(cfg))
    launched = []

    def spy(name):
        real = getattr(tm, name)
        monkeypatch.setattr(tm, name, lambda grid, *args, **meta: (
            launched.append((name, meta.get("BLOCK_N"))), real(grid, *args, **meta))[1])

    for name in ("_launch_splitk", "_launch_splitk_fixed", "_launch_fixed", "_launch_tuned"):
        spy(name)
    for m, n, k in ((3, 96, 1024), (16, 600, 512)):
        a, w, bias, res = _rand(m, k), _rand(n, k) * 0.05, _rand(n), _rand(m, n)
        split = tm._split_k(m, n, k, 1, tm._common.num_sms(0))
        launched.clear()
        outs = []
        for one_pass in (True, False):
            monkeypatch.setattr(tm, "_split_k_one_pass", lambda device, flag=one_pass: flag)
            outs.append(tm._launch(a, w.t(), bias, "gelu", res, None))
        kernel = "_launch_splitk_fixed" if split > 1 else "_launch_fixed"
        assert launched == [(kernel, 32)] * 2, (m, n, k, split, launched)
        assert torch.equal(outs[0], outs[1])
        assert_close_rel(outs[0], _ref(a, w.t(), bias, "gelu", res), TOL[torch.bfloat16])


def test_skinny_config_off_where_not_measured():
    # Only 16-bit operands on sm_90+ get the fixed tile; the interpreter and fp32 autotune.
    assert tm._skinny_config(16, 4096, 4, 0, 1) is None
    assert tm._skinny_config(65, 4096, 2, 0, 1) is None
    assert tm._skinny_config(16, 256, 2, 0, 1) is None
    if not tm._tma_available(0):
        assert tm._skinny_config(16, 4096, 2, 0, 1) is None
    else:
        assert tm._skinny_config(1, 4096, 2, 0, 8)["BLOCK_N"] == 256  # M=1 split: 256 wide
        assert tm._skinny_config(1, 4096, 2, 0, 1)["BLOCK_N"] == 128


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (16, 11008, 4096), (64, 11008, 4096),
                                   (40, 4096, 11008), (8, 32000, 4096)])
def test_matmul_gpu_skinny_eager_and_graph_match_reference(m, n, k):
    a, w, bias, res = _rand(m, k), _rand(n, k) * 0.05, _rand(n), _rand(m, n)
    ref = _ref(a, w.t(), bias, "gelu_tanh", res)
    eager = tm.matmul(a, w.t(), bias=bias, activation="gelu_tanh", residual=res)
    assert_close_rel(eager, ref, TOL[torch.bfloat16])
    assert torch.equal(tm.matmul(a, w.t(), bias=bias, activation="gelu_tanh", residual=res),
                       eager)  # the eager plan's replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tm.matmul(a, w.t(), bias=bias, activation="gelu_tanh", residual=res)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)  # two passes sum the partials in the one pass's order
