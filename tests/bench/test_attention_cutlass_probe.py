"""bench/gpu/attention_cutlass_probe.py on the CPU: its fp32 reference (the library's
bottom-right causal mask, grouped heads, the log-sum-exp) and its report where the backend is
unavailable (the kernels themselves run only on an sm_90 GPU)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from ryzen_opt.kernels import reference

_PATH = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "attention_cutlass_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("attention_cutlass_probe", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_the_library_reference(probe, causal):
    torch.manual_seed(0)
    q = torch.randn(2, 8, 24, 16)
    k, v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    out, lse = probe._ref(q, k, v, causal, 0.3)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=causal, scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    kk = k.repeat_interleave(4, dim=1)
    s = (q @ kk.transpose(-1, -2)) * 0.3
    if causal:  # query i sees keys j <= i + (40 - 24)
        s = s.masked_fill(torch.ones(24, 40, dtype=torch.bool).tril(16).logical_not(), -torch.inf)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report without a GPU")
def test_without_the_backend_it_says_why_and_exits_1(probe, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["attention_cutlass_probe.py"])
    assert probe.main() == 1
    assert "unavailable: no CUDA device" in capsys.readouterr().out
