"""CUTLASS attention backend: what it serves, how it is built, and (GPU) its results.

The build logic runs here against the stand-in ``nvcc`` of ``conftest.toolchain``; the kernels
themselves only on an sm_90 GPU with the toolchain (``gpu``).
"""

import pytest
import torch

from ryzen_opt.kernels import BackendError, reference, registry
from ryzen_opt.kernels.cutlass import _build
from ryzen_opt.kernels.cutlass import attention as ca
from tests.assertions import TOL, assert_close_rel

BF16 = torch.bfloat16


def _meta(*shape, dtype=BF16):
    return torch.empty(*shape, device="meta", dtype=dtype)


# ----------------------------------------------------------------------------- supports


def test_registered_for_attention_on_cuda_only():
    b = registry.backends("attention")["cutlass"]
    assert b.devices == ("cuda",)
    assert not any("cutlass.attention" in m for m in registry.import_errors())


def test_supports_the_prefill_layouts(toolchain):
    _build.build_attention()  # (stand-in nvcc) every kernel in the cache
    q, k = _meta(2, 16, 256, 128), _meta(2, 16, 256, 128)
    assert ca.supports(q, k, k) is None
    assert ca.supports(q, k, k, causal=True) is None
    assert ca.supports(_meta(2, 8, 64, 64), _meta(2, 8, 300, 64), _meta(2, 8, 300, 64)) is None
    # Grouped-query heads and the (batch, seq, heads, dim) memory of an HF attention layer.
    hf_q = _meta(2, 256, 16, 128).transpose(1, 2)
    hf_k = _meta(2, 256, 4, 128).transpose(1, 2)
    assert ca.supports(hf_q, hf_k, hf_k, causal=True) is None
    assert ca.supports(q, _meta(2, 4, 256, 128), _meta(2, 4, 256, 128)) is None


@pytest.mark.parametrize(
    "q, k, kwargs, words",
    [
        (_meta(1, 2, 64, 64, dtype=torch.float16), None, {}, "bfloat16"),
        (_meta(1, 2, 64, 96), None, {}, "head_dim 96"),
        (_meta(1, 2, 60, 64), None, {}, "multiple of 8"),
        (_meta(1, 2, 64, 64), _meta(1, 2, 32, 64), {"causal": True}, "q_len 64 > k_len 32"),
        (_meta(1, 2, 64, 64), None, {"attn_mask": _meta(64, 64, dtype=torch.bool)}, "attn_mask"),
        (_meta(1, 2, 64, 128)[..., ::2], None, {}, "contiguous"),
        (_meta(1, 2, 64, 68)[..., :64], None, {}, "multiples of 8"),
        (torch.empty(1, 2, 64, 64, dtype=BF16), None, {}, "CUDA"),
    ],
)  # fmt: skip
def test_supports_names_what_it_does_not_serve(q, k, kwargs, words):
    k = _meta(1, 2, 64, 64) if k is None else k
    if q.device.type == "cpu":
        k = torch.empty(1, 2, 64, 64, dtype=BF16)
    reason = ca.supports(q, k, k, **kwargs)
    assert reason is not None and words in reason, reason


def test_a_kernel_not_built_is_not_served(toolchain):
    calls, _ = toolchain
    q = _meta(1, 8, 4096, 64)
    reason = ca.supports(q, q, q, causal=True)
    assert "attn_d64_causal_wg3_kv128_rev is not built" in reason, reason
    assert not calls.exists()  # asking built nothing
    _build.build_attention([(64, "causal", "wg3_kv128_rev")])
    assert ca.supports(q, q, q, causal=True) is None
    assert ca.supports(q, q, q) is not None  # the unmasked schedule is another kernel


def test_grouped_query_fold():
    # (b, h) of q fold to (b * hkv, group); k/v heads get stride 0 inside a group.
    q, k = torch.empty(2, 8, 16, 64), torch.empty(2, 2, 24, 64)
    b, h, (sq, sk, sv, so) = ca._folded(q, k, k)
    assert (b, h) == (4, 4)
    assert sq == (4 * 16 * 64, 16 * 64, 64) and sk == (24 * 64, 0, 64) and sv == sk
    assert so == (4 * 16 * 64, 16 * 64, 64)
    # Each folded (batch, head) lands on the query head and kv head it stands for.
    for bb in range(2):
        for hh in range(8):
            fb, fh = bb * 2 + hh // 4, hh % 4
            assert fb * sq[0] + fh * sq[1] == bb * q.stride(0) + hh * q.stride(1)
            assert fb * sk[0] + fh * sk[1] == bb * k.stride(0) + (hh // 4) * k.stride(1)
    # Batch and head strides that do not merge (heads of a larger tensor, or the (batch, seq,
    # heads, dim) memory of an HF layer) fold one batch element at a time.
    kk = torch.empty(2, 4, 24, 64)[:, :2]
    assert ca._folded(q, kk, kk) is None
    b, h, (sq, sk, sv, so) = ca._folded(q, kk, kk, batch=1)
    assert (b, h) == (2, 4) and sk == (kk.stride(1), 0, kk.stride(2))
    meta = [t.to("meta").to(BF16) for t in (q, kk)]
    reason = ca.supports(meta[0], meta[1], meta[1])
    assert reason is None or "is not built" in reason, reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_unavailable_without_a_gpu_and_an_explicit_call_says_why():
    assert ca.available() == "no CUDA device"
    q = torch.randn(1, 2, 8, 64, dtype=BF16)
    with pytest.raises(BackendError, match="cutlass"):
        registry.dispatch("attention", "cutlass", q, q, q)
    with pytest.raises(BackendError, match="no CUDA device"):
        ca.attention(q, q, q)


def test_bad_arguments_are_named_before_the_backend_limits():
    q = torch.randn(1, 2, 8, 64, dtype=BF16)
    with pytest.raises(ValueError, match="head_dim"):
        ca.attention(q, q[..., :32], q[..., :32])
    with pytest.raises(ValueError, match="scale"):
        ca.attention(q, q, q, scale=float("nan"))


# ----------------------------------------------------------------------------- build


def test_attention_sources_name_tile_mask_and_schedule():
    src = _build.attention_source(128, "causal", "persist")
    assert "cute::_128, cute::_128, cute::_128" in src and "true, true, 2, false" in src
    src = _build.attention_source(64, "full", "coop")
    assert "cute::_128, cute::_64, cute::_64" in src and "false, false, 2, false" in src
    src = _build.attention_source(64, "full", "wg3_kv128")
    assert "cute::_192, cute::_128, cute::_64" in src and "false, false, 3, false" in src
    for (d, _), rules in ca.VARIANTS.items():
        assert rules[-1][0] is None and all(name in _build.ATTN_VARIANTS[d] for _, name in rules)
    assert ca.variant(64, False, 1024) == "persist_kv128"
    assert ca.variant(64, False, 4096) == "persist_wg3_kv128"
    assert ca.variant(128, True, 1 << 20) == "coop_rev"
    with pytest.raises(ValueError, match="head_dim"):
        _build.attention_source(96, "full", "coop")
    with pytest.raises(ValueError, match="variant"):
        _build.attention_source(64, "full", "fast")
    with pytest.raises(ValueError, match="variant"):
        _build.attention_source(128, "full", "wg3_kv128")


def test_build_attention_compiles_each_kernel_once(toolchain):
    calls, cache = toolchain
    built = _build.build_attention(jobs=2)
    n = len(_build.ATTN_MASKS) * sum(len(v) for v in _build.ATTN_VARIANTS.values())
    assert len(built) == n and all(p.is_file() for p in built.values())
    lines = calls.read_text().splitlines()
    assert len(lines) == n
    assert all(f"examples/{_build.FMHA_EXAMPLE}" in line for line in lines)
    _build.build_attention()  # cached: no compiler run
    assert len(calls.read_text().splitlines()) == n


def test_build_attention_without_the_fmha_headers_says_so(toolchain, tmp_path):
    (tmp_path / "cutlass" / "examples" / _build.FMHA_EXAMPLE).rmdir()
    assert "88_hopper_fmha" in _build.fmha_reason()
    with pytest.raises(RuntimeError, match="88_hopper_fmha"):
        _build.build_attention([(64, "full", "coop")])


def test_build_attention_rejects_bad_kernels():
    with pytest.raises(ValueError, match="triples"):
        _build.build_attention([(64, "full")])
    with pytest.raises(ValueError, match="mask"):
        _build.build_attention([(64, "sliding", "coop")])


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cutlass = pytest.mark.skipif(
    not torch.cuda.is_available() or ca.available() is not None,
    reason=f"cutlass attention unavailable: {ca.available() if torch.cuda.is_available() else ''}",
)


@pytest.fixture(scope="module")
def built():
    return _build.build_attention()  # every schedule at once, in parallel


def _ref(q, k, v, causal, scale=None):
    d = lambda t: t.detach().double().cpu()
    return reference.attention(d(q), d(k), d(v), causal=causal, scale=scale)


@gpu
@needs_cutlass
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(
    "b, hq, hkv, lq, lk, causal",
    [
        (2, 3, 3, 136, 200, False),
        (2, 3, 3, 136, 200, True),
        (1, 4, 4, 264, 264, True),
        (1, 2, 2, 8, 1, False),
        (2, 8, 2, 192, 301, True),
        (1, 2, 2, 520, 520, False),
    ],
)  # fmt: skip
def test_matches_float64_on_odd_shapes(built, d, b, hq, hkv, lq, lk, causal):
    torch.manual_seed(0)
    q = torch.randn(b, hq, lq, d, device="cuda", dtype=BF16)
    k = torch.randn(b, hkv, lk, d, device="cuda", dtype=BF16)
    v = torch.randn_like(k)
    out = ca.attention(q, k, v, causal=causal)
    assert_close_rel(
        out, _ref(q, k, v, causal), TOL[BF16], f"{b}x{hq}/{hkv}x{lq}x{lk}x{d} {causal}"
    )


@gpu
@needs_cutlass
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_every_schedule_on_odd_shapes(built, d, causal):
    torch.manual_seed(2)
    q = torch.randn(2, 8, 200, d, device="cuda", dtype=BF16)
    k = torch.randn(2, 4, 333, d, device="cuda", dtype=BF16)
    v = torch.randn_like(k)
    ref = _ref(q, k, v, causal)
    for name in _build.ATTN_VARIANTS[d]:
        out, _ = ca._Plan(q, k, v, causal, name)(q, k, v, d**-0.5)
        assert_close_rel(out, ref, TOL[BF16], f"{name} d={d} causal={causal}")


@gpu
@needs_cutlass
def test_scale_strided_query_and_lse(built):
    torch.manual_seed(1)
    q = torch.randn(2, 256, 4, 128, device="cuda", dtype=BF16).transpose(1, 2)
    k = torch.randn(2, 256, 4, 128, device="cuda", dtype=BF16).transpose(1, 2)
    v = torch.randn_like(k)
    out, lse = ca.forward(q, k, v, True, 0.3)
    assert_close_rel(out, _ref(q, k, v, True, 0.3), TOL[BF16], "strided, scale 0.3")
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.3
    s = s.masked_fill(~torch.ones(256, 256, dtype=torch.bool, device="cuda").tril(), float("-inf"))
    # fp32 accumulation over the same bf16 inputs: the probe measured at most 3.8e-6 (absolute)
    # over 77 checks (attention_cutlass_probe-heavy.json); 1e-4 is the fp32 tolerance.
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-4, rtol=0)


@gpu
@needs_cutlass
def test_through_the_registry_and_under_graph_capture(built):
    q = torch.randn(1, 8, 512, 64, device="cuda", dtype=BF16)
    ref = _ref(q, q, q, True)
    assert_close_rel(
        registry.dispatch("attention", "cutlass", q, q, q, causal=True), ref, TOL[BF16]
    )
    ca.attention(q, q, q, causal=True)  # plan made outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ca.attention(q, q, q, causal=True)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    assert_close_rel(out, _ref(q, q, q, True), TOL[BF16], "graph replay")


@gpu
@needs_cutlass
def test_under_torch_compile(built):
    q = torch.randn(1, 4, 256, 128, device="cuda", dtype=BF16)
    f = torch.compile(lambda q: ca.attention(q, q, q, causal=True), fullgraph=True)
    assert_close_rel(f(q), _ref(q, q, q, True), TOL[BF16], "compiled")


def test_cli_builds_the_attention_kernels(toolchain, capsys):
    from ryzen_opt.kernels.cutlass.__main__ import main

    calls, _ = toolchain
    assert main(["--only", "attention", "--jobs", "2"]) == 0
    n = len(_build.ATTN_MASKS) * sum(len(v) for v in _build.ATTN_VARIANTS.values())
    assert len(calls.read_text().splitlines()) == n
    assert f"{n} kernels ready" in capsys.readouterr().out
    assert main([]) == 0  # the matmul's are built now; the attention's are cached
    assert len(calls.read_text().splitlines()) == n + len(_build.LAYOUTS) * len(_build.ACTIVATIONS)


def test_plan_keys_only_for_plain_tensors_without_a_mask():
    q = torch.randn(1, 2, 8, 64)
    assert ca._key(q, q, q, True, None) is not None
    assert ca._key([1], q, q, True, None) is None
    assert ca._key(q, q, q, True, torch.ones(8, 8, dtype=torch.bool)) is None

    class Sub(torch.Tensor):
        pass

    assert ca._key(q, q.as_subclass(Sub), q, False, None) is None


@gpu
@needs_cutlass
def test_a_repeated_signature_replays_its_plan_and_still_checks_alignment(built):
    q = torch.randn(1, 4, 256, 64, device="cuda", dtype=BF16)
    first = ca.attention(q, q, q, causal=True)
    assert ca._key(q, q, q, True, None) in ca._PLANS
    assert torch.equal(ca.attention(q, q, q, causal=True), first)
    with pytest.raises(ValueError, match="scale"):
        ca.attention(q, q, q, causal=True, scale=float("inf"))  # checked on the plan path too
    # Same shape, strides and dtype, 2 bytes past a 16-byte boundary: refused, not run.
    shifted = torch.empty(q.numel() + 1, device="cuda", dtype=BF16)[1:].view(q.shape)
    shifted.copy_(q)
    with pytest.raises(BackendError, match="16-byte aligned"):
        ca.attention(shifted, q, q, causal=True)
