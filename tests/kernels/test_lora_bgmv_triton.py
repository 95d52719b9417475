"""Triton lora_bgmv against the float64 reference (the interpreter on CPU, small shapes;
``gpu``-marked cases at serving shapes, CUDA graphs and the no-host-sync contract)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from ryzen_opt.kernels import reference  # noqa: E402
from ryzen_opt.kernels.triton import lora as tlora  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison():
    # torch.empty fills NaN in deterministic mode: an unwritten output fails the comparison.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _inputs(rows, n_in, n_out, rank, n_adapters, dtype, device=DEVICE):
    mk = lambda *s: torch.randn(*s).to(device=device, dtype=dtype)  # noqa: E731
    x, a, b = mk(rows, n_in), mk(n_adapters, rank, n_in), mk(n_adapters, n_out, rank)
    return x, a, b, (torch.rand(n_adapters) + 0.5).to(device)


def _ref(x, a, b, scales, indices):
    d = lambda t: t.detach().double().cpu()  # noqa: E731
    return reference.lora_bgmv(d(x), d(a), d(b), d(scales), indices.cpu())


def _mixed(rows, n_adapters, device=DEVICE):
    idx = torch.arange(rows) % (n_adapters + 1) - 1
    return idx[torch.randperm(rows)].to(device)


def _check(x, a, b, s, idx, what=""):
    tol = TOL[x.dtype]
    ref = _ref(x, a, b, s, idx)
    assert_close_rel(tlora.lora_bgmv(x, a, b, s, idx), ref, tol, what, reduction=x.shape[1])
    out = torch.randn(ref.shape).to(device=x.device, dtype=x.dtype)
    base = out.double().cpu()
    assert tlora.lora_bgmv(x, a, b, s, idx, out=out) is out
    assert_close_rel(out, base + ref, tol, what + " out+=", reduction=x.shape[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,n_in,n_out,rank,n_adapters",
    [
        (1, 37, 23, 16, 1),  # one decode row, primes
        (5, 64, 40, 8, 4),  # mixed -1 and adapters
        (7, 131, 97, 1, 16),  # rank 1, more adapters than rows
        (3, 33, 29, 64, 4),  # rank 64
    ],
)
def test_lora_matches_reference(rows, n_in, n_out, rank, n_adapters, dtype):
    x, a, b, s = _inputs(rows, n_in, n_out, rank, n_adapters, dtype)
    idx = _mixed(rows, n_adapters) if rows > 1 else torch.tensor([0], device=DEVICE)
    _check(x, a, b, s, idx, f"{rows, n_in, n_out, rank, n_adapters} {dtype}")


def test_tile_config_splits_in_features_for_few_rows_and_covers_them():
    cfg = tlora._tile_config(rows=1, in_features=4096, out_features=4096, rank=16, sms=132)
    assert cfg["SPLITS"] > 1
    assert cfg["SPLITS"] * cfg["K_PER_SPLIT"] >= 4096 > (cfg["SPLITS"] - 1) * cfg["K_PER_SPLIT"]
    assert cfg["K_PER_SPLIT"] % cfg["BLOCK_K"] == 0
    assert cfg["BLOCK_R"] * cfg["BLOCK_K"] <= 4096 and cfg["BLOCK_N"] * cfg["BLOCK_R"] <= 4096
    many = tlora._tile_config(rows=4096, in_features=4096, out_features=4096, rank=16, sms=132)
    assert many["SPLITS"] == 1


def test_split_in_features_matches_reference():
    # sms=4 under the interpreter: 1 row of 600 inputs is cut into several K slices.
    x, a, b, s = _inputs(1, 600, 50, 16, 2, torch.float32)
    assert tlora._tile_config(1, 600, 50, 16, 4)["SPLITS"] > 1
    _check(x, a, b, s, torch.tensor([1], device=DEVICE), "split K")


def test_all_rows_without_adapter_give_zeros_and_leave_out_untouched():
    x, a, b, s = _inputs(4, 20, 12, 8, 3, torch.bfloat16)
    idx = torch.full((4,), -1, device=DEVICE)
    assert torch.equal(tlora.lora_bgmv(x, a, b, s, idx).cpu(), torch.zeros(4, 12).bfloat16())
    out = torch.randn(4, 12, device=DEVICE, dtype=torch.bfloat16)
    base = out.clone()
    tlora.lora_bgmv(x, a, b, s, idx, out=out)
    assert torch.equal(out, base)


def test_non_contiguous_x_a_and_out():
    x = torch.randn(6, 2 * 45, device=DEVICE)[:, ::2]
    a = torch.randn(3, 45, 8, device=DEVICE).transpose(1, 2)  # (3, 8, 45), strided
    b = torch.randn(3, 31, 8, device=DEVICE)
    s = torch.rand(3, device=DEVICE)
    idx = torch.tensor([2, -1, 0, 1, 2, 0], device=DEVICE)
    ref = _ref(x, a, b, s, idx)
    out = torch.randn(31, 6, device=DEVICE).t()
    base = out.double().cpu()
    tlora.lora_bgmv(x, a, b, s, idx, out=out)
    assert_close_rel(out, base + ref, TOL[torch.float32], "strided", reduction=45)


def test_empty_rows():
    x, a, b, s = _inputs(0, 16, 8, 4, 2, torch.float16)
    idx = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert tlora.lora_bgmv(x, a, b, s, idx).shape == (0, 8)
    out = torch.zeros(0, 8, device=DEVICE, dtype=torch.float16)
    assert tlora.lora_bgmv(x, a, b, s, idx, out=out) is out


def test_kernel_gives_no_delta_for_indices_out_of_range():
    # What CUDA callers get (no host-side check there): rows whose index is outside
    # [0, n_adapters) are treated like -1, and A/B are never read out of bounds.
    x, a, b, s = _inputs(4, 24, 10, 8, 2, torch.float32)
    idx = torch.tensor([0, 2, -5, 1], device=DEVICE)
    delta = tlora._launch(x, a, b, s, idx, None)
    assert torch.equal(delta[1:3].cpu(), torch.zeros(2, 10))
    ok = torch.tensor([0, -1, -1, 1], device=DEVICE)
    assert_close_rel(delta, _ref(x, a, b, s, ok), TOL[torch.float32], reduction=24)
    out = torch.randn(4, 10, device=DEVICE)
    base = out.clone()
    tlora._launch(x, a, b, s, idx, out)
    assert torch.equal(out[1:3], base[1:3])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU indices: the interpreter's check")
def test_cpu_indices_out_of_range_raise_naming_indices():
    x, a, b, s = _inputs(3, 8, 6, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="indices must lie"):
        tlora.lora_bgmv(x, a, b, s, torch.tensor([0, 4, 1]))


def test_bad_dtype_and_rank_are_refused_naming_the_argument():
    x, a, b, s = _inputs(2, 8, 6, 2, 2, torch.float64)
    assert "x is torch.float64" in tlora.supports(x, a, b, s, torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(TypeError, match="x is torch.float64"):
        tlora.lora_bgmv(x, a, b, s, torch.tensor([0, 1], device=DEVICE))
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    reason = tlora.supports(meta(2, 8), meta(1, 300, 8), meta(1, 6, 300), meta(1), meta(2))
    assert "rank is 300" in reason


def test_custom_ops_are_registered_with_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, a, b, s = _inputs(3, 8, 6, 2, 2, torch.bfloat16, device="meta")
    with FakeTensorMode() as mode:
        fx, fa, fb, fs = (mode.from_tensor(t) for t in (x, a, b, s))
        fi = mode.from_tensor(torch.empty(3, dtype=torch.int64, device="meta"))
        y = torch.ops.ryzen_opt.triton_lora_bgmv(fx, fa, fb, fs, fi)
        assert y.shape == (3, 6) and y.dtype == torch.bfloat16
        fo = mode.from_tensor(torch.empty(3, 6, dtype=torch.bfloat16, device="meta"))
        assert torch.ops.ryzen_opt.triton_lora_bgmv_add_(fx, fa, fb, fs, fi, fo) is None


def test_custom_ops_pass_opcheck():
    x, a, b, s = _inputs(3, 16, 6, 4, 2, torch.float32)
    idx = torch.tensor([1, -1, 0], device=DEVICE)
    torch.library.opcheck(torch.ops.ryzen_opt.triton_lora_bgmv, (x, a, b, s, idx))
    out = torch.randn(3, 6, device=DEVICE)
    torch.library.opcheck(torch.ops.ryzen_opt.triton_lora_bgmv_add_, (x, a, b, s, idx, out))


@settings(max_examples=8, deadline=None)
@given(
    rows=st.integers(0, 6),
    n_in=st.integers(1, 70),
    n_out=st.integers(1, 70),
    rank=st.integers(1, 20),
    n_adapters=st.integers(1, 5),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_lora_property_matches_reference(rows, n_in, n_out, rank, n_adapters, dtype, data, seed):
    torch.manual_seed(seed)
    indices = data.draw(st.lists(st.integers(-1, n_adapters - 1), min_size=rows, max_size=rows))
    x, a, b, s = _inputs(rows, n_in, n_out, rank, n_adapters, dtype)
    idx = torch.tensor(indices, dtype=torch.int64, device=DEVICE)
    _check(x, a, b, s, idx, f"{indices} {dtype}")


# --- GPU: serving shapes, CUDA graphs, no host sync ------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 61, 1024])
@pytest.mark.parametrize("rank,n_adapters", [(16, 4), (64, 16), (8, 1)])
def test_gpu_serving_shapes_match_reference(rows, rank, n_adapters, dtype):
    x, a, b, s = _inputs(rows, 4096, 2048 + 1, rank, n_adapters, dtype, device="cuda")
    idx = _mixed(rows, n_adapters, device="cuda") if rows > 1 else torch.tensor([0]).cuda()
    _check(x, a, b, s, idx, f"{rows, rank, n_adapters} {dtype}")


@pytest.mark.gpu
def test_gpu_launch_does_not_sync_on_indices():
    x, a, b, s = _inputs(16, 2048, 2048, 16, 4, torch.bfloat16, device="cuda")
    idx = _mixed(16, 4, device="cuda")
    out = torch.zeros(16, 2048, device="cuda", dtype=torch.bfloat16)
    tlora.lora_bgmv(x, a, b, s, idx, out=out)  # first call: compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tlora.lora_bgmv(x, a, b, s, idx, out=out)
        tlora.lora_bgmv(x, a, b, s, idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_a_changed_adapter_mix_without_recapture():
    x, a, b, s = _inputs(16, 2048, 1024, 16, 4, torch.bfloat16, device="cuda")
    idx = torch.zeros(16, dtype=torch.int64, device="cuda")
    delta = tlora.lora_bgmv(x, a, b, s, idx)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        delta = tlora.lora_bgmv(x, a, b, s, idx)
    for mix in ([0] * 16, [3, -1, 1, 2] * 4, [-1] * 16):
        idx.copy_(torch.tensor(mix))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_rel(delta, _ref(x, a, b, s, idx), TOL[torch.bfloat16], str(mix))


@pytest.mark.gpu
def test_gpu_custom_op_compiles_in_one_graph():
    x, a, b, s = _inputs(16, 512, 256, 16, 4, torch.bfloat16, device="cuda")
    idx = _mixed(16, 4, device="cuda")

    def f(x, base):
        return tlora.lora_bgmv(x, a, b, s, idx, out=base.clone())

    base = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True)
    assert_close_rel(compiled(x, base), f(x, base), TOL[torch.bfloat16], "compiled")
