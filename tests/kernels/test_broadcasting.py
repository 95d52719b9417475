"""Shape rules of every op on every CPU backend, fuzzed against the float64 reference.

Shapes include 0 and 1 in every dimension and broadcast batch / mask dimensions; triton runs
under its interpreter, so its shapes stay tiny. The crash that an empty batch once caused
(numba read a batch that did not exist) is first run in a subprocess, so a regression fails
the test instead of killing pytest.
"""

import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ryzen_opt.kernels import attention, backends, decode_attention, layer_norm, matmul, reference
from tests.assertions import TOL, assert_close_rel

ACTS = [None, "gelu", "gelu_tanh", "silu", "relu"]


def _backends(op):
    names = ["reference", "auto"] + [n for n in ("numba", "triton") if n in backends(op)]
    return [
        pytest.param(
            n,
            marks=pytest.mark.skipif(
                n not in ("reference", "auto") and backends(op)[n].available() is not None,
                reason=f"{n} is not available here",
            ),
        )
        for n in names
    ]


def _tol(backend, op):
    if backend == "numba":
        return TOL["fp32_exact"]
    if backend == "triton" and op == "matmul":
        return TOL["tf32"]  # fp32 operands go through TF32 (the triton matmul's contract)
    return TOL[torch.float32]


@pytest.fixture(autouse=True)
def _poison_and_tf32(request):
    # torch.empty fills NaN in deterministic mode: an output element no kernel wrote is NaN.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.use_deterministic_algorithms(True, warn_only=True)
    # TF32 only where the op needs it (the triton matmul serves fp32 only through TF32); the
    # attention kernels then take fp32 dots in full precision on a GPU too (with TF32 one key
    # returned v rounded to TF32: 4.4e-4 relative on an H200, over the fp32 bound).
    torch.backends.cuda.matmul.allow_tf32 = "matmul" in request.node.name
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _d(t):
    return None if t is None or not t.is_floating_point() else t.double()


_CRASHERS = """
import sys
import torch
from ryzen_opt.kernels import matmul
torch.backends.cuda.matmul.allow_tf32 = True
backend, cases = sys.argv[1], eval(sys.argv[2])
if backend == "triton" and torch.cuda.is_available():
    torch.set_default_device("cuda")
for sa, sb in cases:
    out = matmul(torch.randn(sa), torch.randn(sb), backend=backend)
    ref = torch.matmul(torch.randn(sa), torch.randn(sb))
    assert out.shape == ref.shape, (sa, sb, tuple(out.shape), tuple(ref.shape))
print("ok")
"""
_SMALL = [((0, 3, 4), (4, 8)), ((1, 5, 3), (0, 3, 7)), ((0, 5, 6), (1, 6, 2)), ((3, 2), (0, 2, 4))]
# numba read batch 0 of an empty operand: garbage, or a segfault at these sizes.
_LARGE = [((0, 2000, 2000), (2000, 8)), ((4, 2000), (0, 2000, 2000)), ((0, 30, 40), (1, 40, 20))]


@pytest.mark.parametrize(("backend", "cases"), [("numba", _SMALL + _LARGE), ("triton", _SMALL)])
def test_matmul_empty_batch_returns_empty_without_crashing(backend, cases):
    if backend not in backends("matmul") or backends("matmul")[backend].available():
        pytest.skip(f"{backend} is not available here")
    run = subprocess.run(
        [sys.executable, "-c", _CRASHERS, backend, repr(cases)], capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


@pytest.mark.parametrize("backend", _backends("matmul"))
@settings(max_examples=20, deadline=None)
@given(
    mkn=st.tuples(*[st.integers(0, 5)] * 3),
    batches=st.tuples(*[st.sampled_from([None, 0, 1, 3])] * 2),
    activation=st.sampled_from(ACTS),
    bias=st.booleans(),
    residual=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_shapes_broadcast_like_reference(
    backend, mkn, batches, activation, bias, residual, seed
):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip(
            "on a GPU the triton matmul's TF32 gave 1.15e-3 on a 1x1x1 product (H200), over "
            "the 1e-3 TF32 norm bound, which assumes a reduction to average over: this fuzz "
            "of tiny shapes needs a TF32-aware reference (test_triton_matmul.py covers the GPU)"
        )
    (m, k, n), (ba, bb) = mkn, batches
    assume(ba is None or bb is None or ba == bb or 1 in (ba, bb))
    torch.manual_seed(seed)
    a = torch.randn(*(() if ba is None else (ba,)), m, k)
    b = torch.randn(*(() if bb is None else (bb,)), k, n)
    bi = torch.randn(n) if bias else None
    shape = reference.matmul_out_shape(a, b)
    assert shape == tuple(torch.matmul(a, b).shape)
    res = torch.randn(shape) if residual else None
    out = matmul(a, b, bi, activation, res, backend=backend)
    ref = reference.matmul(_d(a), _d(b), _d(bi), activation, _d(res))
    assert_close_rel(out, ref, _tol(backend, "matmul"), f"{a.shape}@{b.shape}", reduction=k)


def _mask_shape(draw_keep, target):
    # Each of the (B, H, Lq, Lk) dims is kept or broadcast (1); leading dims may be dropped.
    keep, lead = draw_keep
    shape = tuple(t if kp else 1 for t, kp in zip(target, keep, strict=True))
    return shape[lead:]


@pytest.mark.parametrize("backend", _backends("attention"))
@settings(max_examples=20, deadline=None)
@given(
    dims=st.tuples(
        st.integers(0, 2),
        st.integers(1, 2),
        st.integers(1, 2),
        st.integers(0, 4),
        st.integers(0, 4),
        st.integers(1, 4),
    ),
    causal=st.booleans(),
    mask=st.sampled_from([None, "bool", "float"]),
    keep=st.tuples(st.tuples(*[st.booleans()] * 4), st.integers(0, 2)),
    seed=st.integers(0, 2**32 - 1),
)
def test_attention_shapes_broadcast_like_reference(backend, dims, causal, mask, keep, seed):
    b, hkv, group, lq, lk, d = dims
    if backend == "triton":
        mask = None  # the triton attention takes no attn_mask (its supports() says so)
    torch.manual_seed(seed)
    q = torch.randn(b, hkv * group, lq, d)
    k, v = torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, d)
    am = None
    if mask is not None:
        shape = _mask_shape(keep, (b, hkv * group, lq, lk))
        am = torch.rand(shape) > 0.3 if mask == "bool" else torch.randn(shape)
    out = attention(q, k, v, causal, None, am, backend=backend)
    ref = reference.attention(
        q.double(),
        k.double(),
        v.double(),
        causal,
        None,
        _d(am) if am is not None and am.is_floating_point() else am,
    )
    assert_close_rel(out, ref, _tol(backend, "attention"), f"{q.shape} {k.shape} mask {am}")


@pytest.mark.parametrize("backend", _backends("decode_attention"))
@settings(max_examples=20, deadline=None)
@given(
    dims=st.tuples(
        st.integers(0, 3),
        st.integers(1, 2),
        st.integers(1, 3),
        st.integers(0, 6),
        st.integers(1, 4),
    ),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_decode_shapes_and_unused_slots_match_reference(backend, dims, data, seed):
    b, hkv, group, max_len, d = dims
    lengths = data.draw(st.lists(st.integers(0, max_len), min_size=b, max_size=b))
    torch.manual_seed(seed)
    q = torch.randn(b, hkv * group, d)
    k, v = torch.randn(b, hkv, max_len, d), torch.randn(b, hkv, max_len, d)
    cl = torch.tensor(lengths, dtype=torch.int64)
    ref = reference.decode_attention(q.double(), k.double(), v.double(), cl)
    # Slots past each row's length hold NaN (torch.empty under deterministic mode): they
    # must not change the result of any backend.
    unused = torch.arange(max_len)[None, :] >= cl[:, None]
    k[unused[:, None, :, None].expand_as(k)] = float("nan")
    v[unused[:, None, :, None].expand_as(v)] = float("nan")
    out = decode_attention(q, k, v, cl, backend=backend)
    assert_close_rel(out, ref, _tol(backend, "decode_attention"), f"{q.shape} {lengths}")


@pytest.mark.parametrize("backend", _backends("layer_norm"))
@settings(max_examples=20, deadline=None)
@given(
    lead=st.lists(st.integers(0, 3), max_size=2),
    n=st.integers(1, 6),
    affine=st.tuples(st.booleans(), st.booleans()),
    residual=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_layer_norm_shapes_match_reference(backend, lead, n, affine, residual, seed):
    torch.manual_seed(seed)
    x = torch.randn(*lead, n)
    w = torch.randn(n) if affine[0] else None
    bias = torch.randn(n) if affine[1] else None
    r = torch.randn(*lead, n) if residual else None
    out = layer_norm(x, w, bias, 1e-5, r, backend=backend)
    ref = reference.layer_norm(_d(x), _d(w), _d(bias), 1e-5, _d(r))
    if residual:
        assert_close_rel(out[1], ref[1], _tol(backend, "layer_norm"), f"{x.shape} h")
        out, ref = out[0], ref[0]
    assert_close_rel(out, ref, _tol(backend, "layer_norm"), f"{x.shape}")
