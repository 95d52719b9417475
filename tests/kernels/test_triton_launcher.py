"""The cached Triton launcher: keys, fallbacks, and (on a GPU) direct launches that give
exactly what Triton's own path gives, for every shape class the cache must keep apart."""

import warnings

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from ryzen_opt.kernels import reference  # noqa: E402
from ryzen_opt.kernels.triton import _common, _launcher  # noqa: E402
from ryzen_opt.kernels.triton import decode_attention as td  # noqa: E402
from ryzen_opt.kernels.triton import layer_norm as tln  # noqa: E402
from ryzen_opt.kernels.triton import matmul as tm  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402


def _ref_mm(a, b):
    return reference.matmul(a.double().cpu(), b.double().cpu())


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr = 128):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + y, mask=mask)


def _axpy(launch, x, y, alpha, block=None):
    out = torch.empty_like(x)
    n = x.numel()
    kw = {} if block is None else {"BLOCK": block}
    b = block or 128
    launch((triton.cdiv(n, b),), x, y, out, n, alpha, **kw)
    return out


def test_value_class_follows_tritons_integer_specialization():
    vc = _launcher._value_class
    assert vc(1) != vc(17)  # == 1 is specialized
    assert vc(32) == vc(48) and vc(32) != vc(40)  # divisibility by 16
    assert vc(2**31) != vc(2**31 - 16)  # 64-bit vs 32-bit
    assert vc(2.5) == 2.5 and vc("tf32") == "tf32"  # non-integers stay exact


def test_unwrap_finds_autotuner_and_heuristics():
    launch = tm._launch_tuned
    assert launch.autotuner is tm._matmul_kernel
    assert [list(h) for h in launch.heuristics] == [["EVEN_K"]]
    assert launch.arg_names[:3] == ["a_ptr", "b_ptr", "c_ptr"]
    assert tm._launch_fixed.autotuner is None


def test_loose_must_name_parameters():
    with pytest.raises(ValueError, match="does not have"):
        _launcher.CachedLauncher(_axpy_kernel, loose=("nope",))


def test_loose_ints_only_for_plain_kernels():
    launch = _launcher.CachedLauncher(_axpy_kernel, loose="ints")
    assert launch.loose == tuple(range(len(launch.arg_names)))
    with pytest.raises(ValueError, match="autotune or heuristics"):
        _launcher.CachedLauncher(tm._matmul_kernel, loose="ints")
    with pytest.raises(ValueError, match="heuristics"):
        _launcher.CachedLauncher(tm._matmul_kernel_fixed, loose="ints")
    with pytest.raises(ValueError, match="'ints'"):
        _launcher.CachedLauncher(_axpy_kernel, loose="n")


def test_loose_arguments_share_an_entry_only_within_a_value_class():
    launch = _launcher.CachedLauncher(_axpy_kernel, loose=("n",))
    x = torch.zeros(64)
    key = lambda n: launch._key((x, x, x, n, 2.0), {})  # noqa: E731
    if not torch.cuda.is_available():
        pytest.skip("keys name the current CUDA device")
    assert key(32) == key(64) and key(32) != key(33) and key(1) != key(17)


@pytest.mark.parametrize(
    "value,allowed",
    [("0", False), ("off", False), (" False ", False), ("no", False), ("1", True), ("", True)],
)
def test_environment_switch(monkeypatch, value, allowed):
    monkeypatch.setenv("RYZEN_OPT_DIRECT_LAUNCH", value)
    assert _launcher._env_allows() is allowed
    monkeypatch.delenv("RYZEN_OPT_DIRECT_LAUNCH")
    assert _launcher._env_allows()


@pytest.mark.skipif(not _common.INTERPRET, reason="the interpreter's behaviour")
def test_interpreter_takes_tritons_own_path():
    assert not _launcher.enabled()
    assert not _launcher.set_enabled(True)  # cannot be enabled under the interpreter
    launch = _launcher.CachedLauncher(_axpy_kernel)
    assert launch.jit is None
    x, y = torch.randn(300), torch.randn(300)
    torch.testing.assert_close(_axpy(launch, x, y, 2.0), 2.0 * x + y)
    assert launch.hits == launch.misses == 0


@pytest.mark.skipif(not _common.INTERPRET, reason="the interpreter's behaviour")
def test_interpreter_matmul_makes_no_eager_plans():
    stats = dict(tm._plan_state)
    a, w = torch.randn(3, 40, dtype=torch.float16), torch.randn(24, 40, dtype=torch.float16)
    for _ in range(2):
        assert_close_rel(tm.matmul(a, w.t()), _ref_mm(a, w.t()), TOL[torch.float16])
    assert not tm._PLANS
    assert (tm._plan_state["hits"], tm._plan_state["misses"]) == (stats["hits"], stats["misses"])


def test_eager_plans_switch_returns_the_old_setting_and_clears():
    old = tm.eager_plans()
    try:
        tm._PLANS["sentinel"] = object()
        assert tm.eager_plans(False) == old
        assert not tm._PLANS and tm.eager_plans() is False
        assert tm.eager_plans(True) is False and tm.eager_plans() is True
    finally:
        tm.eager_plans(old)


gpu = pytest.mark.gpu


@pytest.fixture
def direct():
    old = _launcher.set_enabled(True)
    assert _launcher.enabled()
    yield
    _launcher.set_enabled(old)


@gpu
def test_direct_launch_hits_and_matches(direct):
    launch = _launcher.CachedLauncher(_axpy_kernel, loose=("n",))
    for n in (1000, 1000, 1008, 1000):  # 1008 % 16 == 0: another value class, another entry
        x = torch.randn(n, device="cuda")
        y = torch.randn(n, device="cuda")
        torch.testing.assert_close(_axpy(launch, x, y, 0.5), 0.5 * x + y, rtol=0, atol=1e-6)
    assert launch.misses == 2 and launch.hits == 2


@gpu
def test_misaligned_pointer_gets_its_own_kernel(direct):
    launch = _launcher.CachedLauncher(_axpy_kernel)
    base = torch.randn(4097, device="cuda")
    y = torch.randn(4096, device="cuda")
    aligned, shifted = base[:4096], base[1:]  # 4-byte offset: not 16-byte aligned
    for x in (aligned, shifted, aligned, shifted):
        torch.testing.assert_close(_axpy(launch, x, y, 3.0), 3.0 * x + y, rtol=0, atol=1e-5)
    assert launch.misses == 2 and launch.hits == 2


@gpu
def test_defaults_and_constexpr_kwargs_are_keyed(direct):
    launch = _launcher.CachedLauncher(_axpy_kernel)
    x = torch.randn(1000, device="cuda")
    y = torch.randn(1000, device="cuda")
    for block in (None, 256, None, 256):
        torch.testing.assert_close(_axpy(launch, x, y, 1.5, block), 1.5 * x + y)
    assert launch.misses == 2 and launch.hits == 2


@gpu
def test_failed_direct_launch_falls_back_with_one_warning(direct, monkeypatch):
    launch = _launcher.CachedLauncher(_axpy_kernel)
    x = torch.randn(512, device="cuda")
    y = torch.randn(512, device="cuda")
    _axpy(launch, x, y, 1.0)
    key = next(iter(launch._cache))
    compiled, meta, tail = launch._cache[key]

    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("launcher ABI changed")

    launch._cache[key] = (Broken(), meta, tail)
    monkeypatch.setitem(_launcher._state, "warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _axpy(launch, x, y, 1.0)
    torch.testing.assert_close(out, x + y)
    assert not _launcher.enabled()
    assert any("direct Triton launch" in str(w.message) for w in caught)


@gpu
@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 4096, 4096),
        (16, 4096, 4096),
        (33, 1000, 4104),
        (64, 11008, 4096),
        (7, 96, 80),
        (300, 512, 512),
        (1024, 2048, 1024),
    ],
)
def test_matmul_repeated_calls_match_reference(direct, m, n, k):
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):  # a miss, then direct launches
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        assert_close_rel(tm.matmul(a, w.t()), _ref_mm(a, w.t()), TOL[torch.bfloat16])


@gpu
def test_matmul_varying_m_and_alignment_share_nothing_wrong(direct):
    w = torch.randn(768, 512, device="cuda", dtype=torch.float16)
    base = torch.randn(64 * 512 + 8, device="cuda", dtype=torch.float16)
    for m in (1, 2, 3, 16, 17, 1, 48, 64, 5):
        for offset in (0, 1, 8):  # 1: a 2-byte shift, 8: 16-byte aligned again
            a = base[offset : offset + m * 512].view(m, 512)
            assert_close_rel(tm.matmul(a, w.t()), _ref_mm(a, w.t()), TOL[torch.float16])


@gpu
def test_matmul_direct_equals_tritons_path_bitwise(direct):
    a = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, 2048, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
    fast = [tm.matmul(a, w.t(), bias=bias, activation="gelu") for _ in range(3)]
    _launcher.set_enabled(False)
    slow = tm.matmul(a, w.t(), bias=bias, activation="gelu")
    for f in fast:
        assert torch.equal(f, slow)


@gpu
def test_matmul_direct_launch_is_graph_capturable(direct):
    a = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    tm.matmul(a, w.t())  # warm: the miss compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tm.matmul(a, w.t())
    a.copy_(torch.randn_like(a))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_rel(out, _ref_mm(a, w.t()), TOL[torch.bfloat16])


@gpu
def test_layer_norm_and_decode_attention_repeat_with_growing_sizes(direct):
    w = torch.randn(768, device="cuda")
    b = torch.randn(768, device="cuda")
    for rows in (1, 5, 16, 37, 5):
        x = torch.randn(rows, 768, device="cuda")
        ref = reference.layer_norm(*(t.double().cpu() for t in (x, w, b)), 1e-5)
        assert_close_rel(tln.layer_norm(x, w, b, 1e-5), ref, TOL[torch.float32])
    hq, hkv, d = 8, 2, 64
    q = torch.randn(2, hq, d, device="cuda", dtype=torch.float16)
    for length in (17, 18, 19, 64, 65, 300):  # a cache that grows by one position and jumps
        kc = torch.randn(2, hkv, length, d, device="cuda", dtype=torch.float16)
        vc = torch.randn(2, hkv, length, d, device="cuda", dtype=torch.float16)
        lens = torch.tensor([length, length - 3], device="cuda", dtype=torch.int32)
        out = td.decode_attention(q, kc, vc, lens)
        ref = reference.decode_attention(*(t.double().cpu() for t in (q, kc, vc)), lens.cpu())
        assert_close_rel(out, ref, TOL[torch.float16])


@gpu
def test_split_k_scratch_is_per_stream(direct):
    # Two streams run split-K matmuls at once: each keeps its own partials and counters.
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    a1 = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    a2 = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    assert tm._split_k(1, 4096, 4096, 1, _common.num_sms(0)) > 1
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    outs = []
    for _ in range(10):
        with torch.cuda.stream(s1):
            o1 = tm.matmul(a1, w.t())
        with torch.cuda.stream(s2):
            o2 = tm.matmul(a2, w.t())
        outs.append((o1, o2))
    torch.cuda.synchronize()
    r1, r2 = _ref_mm(a1, w.t()), _ref_mm(a2, w.t())
    for o1, o2 in outs:
        assert_close_rel(o1, r1, TOL[torch.bfloat16])
        assert_close_rel(o2, r2, TOL[torch.bfloat16])


@gpu
def test_split_k_two_pass_is_compiled_inside_a_capture_after_eager_warm_up(direct):
    # Eager calls take the one-pass split-K; a capture then takes the two-pass one, compiled
    # for the first time inside the capture (no autotuning there: the pass is not a key).
    w = torch.randn(2752, 4096, device="cuda", dtype=torch.bfloat16)  # a shape no test uses
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    assert tm._split_k(3, 2752, 4096, 1, _common.num_sms(0)) > 1
    reduce_calls = tm._launch_reduce.hits + tm._launch_reduce.misses
    eager = tm.matmul(x, w.t())
    assert tm._launch_reduce.hits + tm._launch_reduce.misses == reduce_calls  # one pass
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tm.matmul(x, w.t())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tm.matmul(x, w.t())
    assert tm._launch_reduce.hits + tm._launch_reduce.misses == reduce_calls + 1  # two passes
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_rel(out, _ref_mm(x, w.t()), TOL[torch.bfloat16])
    assert torch.equal(out, tm.matmul(x, w.t()))  # both passes sum in split order
    assert not torch.equal(out, eager)


@pytest.fixture
def plans(direct):
    old = tm.eager_plans(True)
    yield
    tm.eager_plans(old)


def _plan_cases():
    g = torch.Generator(device="cuda").manual_seed(3)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=g)

    w1, w2, w3 = rnd(4096, 4096), rnd(3072, 2048), rnd(1024, 1024)
    return {
        # name: (a maker, b, keyword arguments)
        "split-K M=1": (lambda: rnd(1, 4096), w1.t(), {}),
        "split-K M=16 bias gelu": (lambda: rnd(16, 2048), w2.t(),
                                   {"bias": rnd(3072), "activation": "gelu"}),
        "small config 7x96x80 residual": (lambda: rnd(7, 80), rnd(96, 80).t(),
                                          {"residual": rnd(7, 96), "activation": "silu"}),
        "tuned 300x1024x1024 fp32 out": (lambda: rnd(300, 1024), w3.t(),
                                         {"out_dtype": torch.float32}),
        "batched 3x5x64 @ 3x64x48": (lambda: rnd(3, 5, 64), rnd(3, 64, 48), {}),
    }


@gpu
def test_eager_plans_replay_bitwise_what_the_checked_path_gives(plans):
    for name, (make_a, b, kw) in _plan_cases().items():
        inputs = [make_a() for _ in range(3)]  # new values (and addresses) every call
        hits = tm._plan_state["hits"]
        fast = [tm.matmul(a, b, **kw) for a in inputs]
        assert tm._plan_state["hits"] == hits + 2, name  # the first call makes the plan
        tm.eager_plans(False)
        slow = [tm.matmul(a, b, **kw) for a in inputs]
        tm.eager_plans(True)
        for f, s_, a in zip(fast, slow, inputs, strict=True):
            assert torch.equal(f, s_), name
            ref = _ref_mm(a, b)
            if "bias" in kw or "residual" in kw:
                ref = reference.matmul(a.double().cpu(), b.double().cpu(),
                                       **{k: (v.double().cpu() if torch.is_tensor(v) else v)
                                          for k, v in kw.items() if k != "out_dtype"})
            assert_close_rel(f, ref, TOL[torch.bfloat16], name)


@gpu
def test_eager_plans_do_not_skip_the_checks_for_another_signature(plans):
    a = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        tm.matmul(a, w.t(), bias=bias)
    with pytest.raises(ValueError, match="bias"):
        tm.matmul(a, w.t(), bias=bias.cpu())  # another device: not the plan
    with pytest.raises(ValueError, match="bias"):
        tm.matmul(a, w.t(), bias=bias[:128])  # another shape
    with pytest.raises(ValueError, match="must be on one device"):
        tm.matmul(a, w.t().cpu())
    x = torch.randn(4, 512, device="cuda")
    wf = torch.randn(256, 512, device="cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        for _ in range(2):
            tm.matmul(x, wf.t())
        torch.backends.cuda.matmul.allow_tf32 = False
        with pytest.raises(TypeError, match="allow_tf32"):
            tm.matmul(x, wf.t())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@gpu
def test_eager_plan_failure_falls_back_with_a_warning(plans):
    a = torch.randn(2, 256, device="cuda", dtype=torch.float16)
    w = torch.randn(128, 256, device="cuda", dtype=torch.float16)
    tm.matmul(a, w.t())
    (plan,) = [p for k, p in tm._PLANS.items() if k[0] == a.shape and k[5] == w.t().shape]

    def broken(*args):
        raise RuntimeError("launcher ABI changed")

    plan.run = broken
    with pytest.warns(RuntimeWarning, match="eager matmul"):
        out = tm.matmul(a, w.t())
    assert_close_rel(out, _ref_mm(a, w.t()), TOL[torch.float16])
    assert tm.eager_plans() is False and not tm._PLANS


def _training_calls(device="cuda"):
    """One forward + backward of each training op and a LoRA call, on odd sizes."""
    from ryzen_opt.kernels.triton import lora as tlora
    from ryzen_opt.kernels.triton import training as tt

    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_()

    outs = []
    x, w = rnd(5, 37, 96), rnd(96)
    r = rnd(5, 37, 96)
    y, h = tt.rms_norm_residual(x, r, w, eps=1e-6)
    outs += [y, h, *torch.autograd.grad((y.float().square().sum(), h.float().sum()), (x, r, w))]
    gate, up = rnd(3, 41, 160), rnd(3, 41, 160)
    y = tt.swiglu(gate, up)
    outs += [y, *torch.autograd.grad(y.float().sum(), (gate, up))]
    q, k, v = rnd(2, 4, 33, 64), rnd(2, 2, 33, 64), rnd(2, 2, 33, 64)
    y = tt.attention(q, k, v, causal=True)
    outs += [y, *torch.autograd.grad(y.float().sum(), (q, k, v))]
    xs = torch.randn(7, 96, device=device, dtype=torch.bfloat16, generator=g)
    a = torch.randn(3, 8, 96, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(3, 72, 8, device=device, dtype=torch.bfloat16, generator=g)
    idx = torch.tensor([0, 2, 1, -1, 0, 1, 2], device=device)
    outs.append(tlora.lora_bgmv(xs, a, b, torch.ones(3, device=device), idx))
    return [o.detach() for o in outs]


@gpu
def test_training_ops_and_lora_direct_equal_tritons_path_bitwise(direct):
    from ryzen_opt.kernels.triton import lora as tlora
    from ryzen_opt.kernels.triton.training import _norm, attention_op, swiglu_op

    launchers = (_norm._launch_norm_fwd, _norm._launch_norm_bwd, swiglu_op._launch_swiglu,
                 attention_op._launch_fwd, attention_op._launch_bwd_dq, tlora._launch_shrink)
    _training_calls()  # compiles; the next calls hit
    hits = [lc.hits for lc in launchers]
    direct_outs = _training_calls()
    assert all(lc.hits > h for lc, h in zip(launchers, hits, strict=True))
    _launcher.set_enabled(False)
    plain_outs = _training_calls()
    for d, p in zip(direct_outs, plain_outs, strict=True):
        assert torch.equal(d, p)
