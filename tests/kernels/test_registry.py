"""The backend registry: explicit choice raises, auto falls back and records why."""

import pytest
import torch

from ryzen_opt.kernels import BackendError, matmul, registry


@pytest.fixture
def fake_backend():
    calls = []

    def launcher(a, b, *rest):
        calls.append(a.shape)
        return a @ b

    def supports(a, b, *rest):
        return None if a.shape[0] % 2 == 0 else "only even M"

    registry.register("matmul", "fake", ("cpu",), launcher, supports)
    yield calls
    registry.unregister("matmul", "fake")
    registry.clear_decisions()


def test_explicit_backend_serves_or_raises_with_the_reason(fake_backend):
    a, b = torch.randn(4, 3), torch.randn(3, 2)
    matmul(a, b, backend="fake")
    assert fake_backend == [(4, 3)]
    with pytest.raises(BackendError, match="only even M"):
        matmul(torch.randn(3, 3), b, backend="fake")


def test_unknown_backend_raises_listing_the_known_ones():
    with pytest.raises(BackendError, match="reference"):
        matmul(torch.randn(2, 2), torch.randn(2, 2), backend="nope")


def test_wrong_device_raises_for_an_explicit_backend(fake_backend):
    registry._REGISTRY["matmul"]["fake"] = registry.Backend(
        "matmul", "fake", ("cuda",), lambda *a: None
    )
    with pytest.raises(BackendError, match="runs on cuda"):
        matmul(torch.randn(2, 2), torch.randn(2, 2), backend="fake")


def test_auto_uses_reference_without_a_measured_decision(fake_backend):
    out = matmul(torch.randn(4, 3), torch.randn(3, 2))
    assert out.shape == (4, 2) and fake_backend == []
    assert registry.last_choice("matmul") == ("reference", "no measured decision for this shape")


def test_auto_uses_a_recorded_decision_and_falls_back_when_it_cannot_serve(fake_backend):
    a, b = torch.randn(4, 3), torch.randn(3, 2)
    args = (a, b, None, None, None, None)
    registry.record_decision("matmul", "cpu", registry.shape_key(*args), "fake")
    matmul(a, b)
    assert fake_backend == [(4, 3)]
    assert registry.last_choice("matmul") == ("fake", "measured decision")


def test_reserved_and_unknown_ops_are_refused():
    with pytest.raises(ValueError, match="reserved"):
        registry.register("matmul", "auto", ("cpu",), lambda: None)
    with pytest.raises(ValueError, match="op must be"):
        registry.register("conv", "x", ("cpu",), lambda: None)
