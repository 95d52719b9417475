"""Counter-based randomness and inverse-CDF token picking."""

from __future__ import annotations

import numpy as np
import torch

from ryzen_opt.scaling import SamplingConfig
from ryzen_opt.scaling.sampling import candidate_uniforms, pick_tokens


def test_uniforms_depend_only_on_seed_prompt_candidate_and_step():
    a = candidate_uniforms(3, 5, [0, 1, 2, 3], 6)
    assert a.shape == (4, 6) and ((a >= 0) & (a < 1)).all()
    np.testing.assert_array_equal(candidate_uniforms(3, 5, [2], 6)[0], a[2])
    np.testing.assert_array_equal(candidate_uniforms(3, 5, [0, 1, 2, 3], 3), a[:, :3])
    assert not np.array_equal(candidate_uniforms(4, 5, [0], 6), a[:1])
    assert not np.array_equal(candidate_uniforms(3, 6, [0], 6), a[:1])


def test_uniforms_look_uniform_and_uncorrelated():
    u = candidate_uniforms(0, 0, range(2000), 50)
    assert abs(u.mean() - 0.5) < 0.005
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / u.size
    assert np.abs(hist - 0.1).max() < 0.005
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.06


def test_inverse_cdf_picks_follow_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3])
    logits = probs.log().expand(20000, 4)
    u = torch.from_numpy(candidate_uniforms(1, 0, range(20000), 1)[:, 0])
    tok = pick_tokens(logits, u, SamplingConfig())
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    assert freq[1] == 0, "a zero-probability token was drawn"
    assert torch.allclose(freq, probs, atol=0.015), freq


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(4000, 5)
    u = torch.from_numpy(candidate_uniforms(2, 0, range(4000), 1)[:, 0])
    assert set(pick_tokens(logits, u, SamplingConfig(top_k=2)).tolist()) == {0, 1}
    p = torch.softmax(logits[0], 0)
    assert p[0] < 0.6 < p[0] + p[1]
    assert set(pick_tokens(logits, u, SamplingConfig(top_p=0.6)).tolist()) == {0, 1}


def test_zero_temperature_is_argmax():
    logits = torch.randn(7, 11)
    u = torch.rand(7, dtype=torch.float64)
    assert torch.equal(pick_tokens(logits, u, SamplingConfig(temperature=0.0)), logits.argmax(-1))
