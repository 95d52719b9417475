"""bench.train_noise_floor: the one-ulp nudge, and the refusal without CUDA."""

from __future__ import annotations

import pytest
import torch

from bench import train_noise_floor as tnf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ulp_nudge_moves_every_weight_by_exactly_one_ulp(dtype):
    model = torch.nn.Linear(16, 8).to(dtype)
    nudged = tnf._ulp_nudge(model)
    for p, q in zip(model.parameters(), nudged.parameters(), strict=True):
        up = torch.nextafter(p, torch.full_like(p, float("inf")))
        down = torch.nextafter(p, torch.full_like(p, float("-inf")))
        assert bool(((q == up) | (q == down)).all())
        assert bool((q != p).all())
        assert 0 < int((q == up).sum()) < p.numel()  # both directions occur
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), nudged.parameters(),
                                                        strict=True))  # fmt: skip


def test_without_cuda_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tnf.main(["--lrs", "1e-5"]) == 2
    assert "CUDA" in capsys.readouterr().err
