"""The whole-model check drops only the fast-path routes of the runs it found slower (and
checks again) instead of reverting every swap; errors still revert everything."""

from __future__ import annotations

import pytest
import torch

from ryzen_opt import OptimizeConfig, optimize, optimizer
from ryzen_opt.models import ModelConfig, SimpleTransformerModel
from ryzen_opt.optimization.fastpaths import FastPaths
from ryzen_opt.optimization.report import ModelCheck, SiteReport

pytest.importorskip("numba")


class _Path:
    def __init__(self, name):
        self.name = name


def _paths():
    a, b, p = _Path("a"), _Path("b"), _Path("p")
    return FastPaths([(1, 15, a), (16, 16, b)], {(16, 128): p})


def _check(case, shape, verdict, speedup=0.9):
    return ModelCheck(case, shape, 0.0, 1e-4, speedup, (0.8, 0.95), verdict)


def test_a_slower_decode_batch_loses_its_route_and_its_site_choice():
    paths = _paths()
    site = SiteReport(
        "(whole model)", "decode step", "", chosen={"decode b1": "a", "decode b16": "b"}
    )
    checks = [_check("decode", "1x1 after 127", "faster", 1.7)]
    checks.append(_check("decode", "16x1 after 127", "slower", 0.91))
    dropped = optimizer.drop_slower_routes(paths, checks, [site])
    assert dropped == ["decode batch 16-16: b (0.91x)"]
    assert [r[2].name for r in paths.decode] == ["a"] and (16, 128) in paths.prefill
    assert site.chosen == {"decode b1": "a"} and "whole model slower at 16x1" in site.note


def test_a_slower_prefill_shape_loses_its_graph():
    paths = _paths()
    assert optimizer.drop_slower_routes(paths, [_check("prefill", "16x128", "slower")]) == [
        "prefill 16x128: p (0.90x)"
    ]
    assert paths.prefill == {} and len(paths.decode) == 2


@pytest.mark.parametrize(
    "check",
    [
        _check("decode", "16x1 after 127", "error"),  # wrong results revert everything
        _check("decode", "32x1 after 127", "slower"),  # a batch no route serves
        _check("generate", "1x8", "slower"),  # not a run a route serves
    ],
)
def test_failures_a_route_did_not_cause_revert_everything(check):
    paths = _paths()
    assert optimizer.drop_slower_routes(paths, [check]) is None
    assert len(paths.decode) == 2  # nothing dropped


def _optimize(monkeypatch, tmp_path, check):
    """``optimize()`` of a small seed model whose fast-path selection routes batches 1-15 and
    16 to the fused Numba step (fixed, so the test is about the check alone) and whose
    whole-model check is ``check``."""
    from ryzen_opt.optimization.engine import Engine
    from ryzen_opt.optimization.fastpaths import NumbaFusedDecode

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, embedding_dim=40, num_heads=5, num_layers=2, ff_dim=70)
    model = SimpleTransformerModel(cfg).eval()
    path = NumbaFusedDecode("serial")
    routes = FastPaths([(1, 15, path), (16, 16, path)])
    monkeypatch.setattr(Engine, "fast_paths", lambda self, m, runs, sites: ([], routes))
    monkeypatch.setattr(optimizer, "check_whole_model", check)
    return model, optimize(model, config=OptimizeConfig(cache_dir=tmp_path, backends=(), repeat=5))


def _slower_at_16(report):
    report.model_checks.append(_check("decode", "16x1 after 127", "slower", 0.9))
    return "decode 16x1 after 127: whole model slower (0.90x)"


def test_optimize_keeps_the_routes_that_were_not_slower(monkeypatch, tmp_path):
    real = optimizer.check_whole_model
    calls = []

    def check(cfg, reference, m, runs, device, report):
        calls.append(list(m._fast_paths.describe()))
        failure = real(cfg, reference, m, runs, device, report)
        if len(calls) == 1:  # the first round: batch 16 measured slower
            return _slower_at_16(report)
        return None if failure and "slower" in failure else failure

    model, fast = _optimize(monkeypatch, tmp_path, check)
    notes = fast.optimization_report.notes
    assert len(calls) == 2, notes
    assert any("dropped the fast paths" in n and "decode batch 16-16" in n for n in notes), notes
    assert not any(n.startswith("reverted every swap") for n in notes), notes
    assert all("16-16" not in r for r in calls[1])  # the second round ran without it
    assert [lo for lo, _, _ in fast._fast_paths.decode] == [1]
    ids = torch.randint(0, 97, (1, 5))
    assert torch.equal(fast.generate(ids, 6), model.generate(ids, 6))


def test_an_error_in_the_second_round_reverts_every_swap(monkeypatch, tmp_path):
    rounds = []

    def check(cfg, reference, m, runs, device, report):
        rounds.append(1)
        if len(rounds) == 1:
            return _slower_at_16(report)
        report.model_checks.append(_check("decode", "1x1 after 127", "error"))
        return "decode 1x1 after 127: relative error 1e-2"

    _, fast = _optimize(monkeypatch, tmp_path, check)
    notes = fast.optimization_report.notes
    assert len(rounds) == 2 and any(n.startswith("reverted every swap") for n in notes), notes
    assert "_fast_paths" not in fast.__dict__ and type(fast) is SimpleTransformerModel
