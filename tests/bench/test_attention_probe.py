"""bench/gpu/attention_probe.py: its TMA-descriptor kernel and both second variants (warp
specialization, hand-pipelined loop) against the float64 reference (interpreter on CPU)."""

import importlib.util
from pathlib import Path

import pytest
import torch
import triton

_PATH = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "attention_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("attention_probe", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ["ws", "pipe"])
@pytest.mark.parametrize("second", [False, True])
@pytest.mark.parametrize(
    "b,hq,hkv,lq,lk,causal",
    [
        (1, 2, 1, 70, 45, True),  # rows that see no key: zeros
        (1, 2, 2, 33, 100, False),  # q_len != k_len, lengths off the tile
        (1, 2, 1, 64, 64, True),  # whole tiles: the pipelined loop's full range
        (1, 1, 1, 1, 37, True),  # one query row
    ],
)
def test_probe_kernel_matches_float64(probe, mode, second, b, hq, hkv, lq, lk, causal):
    if torch.cuda.is_available():
        pytest.skip("the GPU run of the probe checks itself (its 'check' rows)")
    triton.set_allocator(probe._alloc)
    d = 16
    q = torch.randn(b, hq, lq, d)
    k = torch.randn(b, hkv, lk, d)
    v = torch.randn(b, hkv, lk, d)
    o = probe.tma_attention(q, k, v, causal, (32, 16, 1, 4, second), mode)
    ref = probe.ref64(q, k, v, causal)
    # float32, online softmax (not the reference's order): DESIGN.md's 1e-4 relative error
    rel = float((o.double() - ref).norm() / ref.norm())
    assert rel <= 1e-4, rel
