"""bench.model variants: each runs the same workloads and matches the baseline's logits."""

import pytest
import torch

from bench import model as bm
from ryzen_opt.models import ModelConfig, SimpleTransformerModel


@pytest.mark.parametrize("name", ["baseline", "onnxruntime"])
def test_variant_matches_baseline_logits_and_greedy_tokens(name):
    torch.manual_seed(0)
    base = SimpleTransformerModel(ModelConfig(num_layers=1, max_seq_len=24)).eval()
    obj = bm.VARIANTS[name].build(base, "cpu")
    x = torch.randint(0, 2048, (2, 6))
    with torch.no_grad():
        ref, _ = base(x)
        out, _ = obj(x)
    assert float((out - ref).abs().max()) < 1e-4
    assert torch.equal(obj.generate(x[:, :1], 8), base.generate(x[:, :1], 8))


def test_unknown_variant_exits_2(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bench.model", "--variants", "nope"])
    assert bm.main() == 2
    assert "unknown" in capsys.readouterr().err


def test_peak_memory_is_collected_for_every_available_variant(monkeypatch):
    calls = []

    def fake(name, workload, device):
        calls.append((name, workload, device))
        return len(calls)

    monkeypatch.setattr(bm, "peak_memory_fresh", fake)
    results = {"baseline": {"reason": None}, "onnxruntime": {"reason": "CPU-only"}}
    variants = [bm.VARIANTS["baseline"], bm.VARIANTS["onnxruntime"]]
    bm._peak_memory_all(results, variants, "cpu")
    workloads = ["ttft", *[f"decode b{b}" for b in bm.DECODE_BATCHES]]
    assert [c[1] for c in calls] == workloads
    assert set(results["baseline"]["peak"]) == set(workloads)
    assert "peak" not in results["onnxruntime"]


def test_max_logit_diff_reports_what_a_variant_chose():
    from ryzen_opt.optimization.report import OptimizationReport, SiteReport

    def build(model, device):
        report = OptimizationReport(model="M", device=device, dtype="float32")
        site = SiteReport("(whole model)", "decode step", "fast path")
        site.chosen["decode b1"] = "numba_fused_decode[serial]"
        report.sites.append(site)
        model.optimization_report = report
        with torch.no_grad():
            model.head.weight[0, 0] += 0.5  # a visible logit change
        return model

    diff, chosen = bm.max_logit_diff(bm.Variant("fake", build), "cpu")
    assert chosen == {"(whole model) decode b1": "numba_fused_decode[serial]"}
    assert diff > 0
    diff, chosen = bm.max_logit_diff(bm.VARIANTS["baseline"], "cpu")
    assert (diff, chosen) == (0.0, {})
