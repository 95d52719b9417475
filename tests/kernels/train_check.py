"""Forward + backward of a training op against the float64 reference (autograd on copies)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tests.assertions import TOL, assert_close_rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def leaf(*shape, dtype, scale=1.0, grad=True) -> torch.Tensor:
    """A random leaf tensor on DEVICE (unit normals times ``scale``)."""
    t = (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(grad)


def _tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def check_fwd_bwd(
    op: Callable,
    ref: Callable,
    leaves: Sequence[torch.Tensor],
    build: Callable[[Sequence[torch.Tensor]], tuple],
    dtype: torch.dtype,
    what: str = "",
    reductions: dict[str, int] | None = None,
) -> None:
    """Run ``op(*build(leaves))`` and ``ref(*build(float64 copies))``, back-propagate the same
    random output gradients through both, and compare every output and every leaf gradient
    with the dtype's tolerance. ``build`` makes the call's arguments from the leaves (views,
    transposes, None), so non-contiguous inputs are checked through their leaves' gradients.
    ``reductions`` gives the sum length behind a named result (``out0``, ``grad1``...) for the
    error floor of results that can cancel (see ``reference.error_floor``)."""
    tol = TOL[dtype]
    red = reductions or {}
    for t in leaves:
        t.grad = None
    d_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    outs = _tuple(op(*build(leaves)))
    refs = _tuple(ref(*build(d_leaves)))
    assert len(outs) == len(refs)
    grads = [torch.randn(o.shape, device=o.device, dtype=torch.float32).to(o.dtype) for o in outs]
    for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
        assert o.dtype == dtype, f"{what} out{i} dtype {o.dtype} != {dtype}"
        assert_close_rel(o, r, tol, f"{what} out{i}", reduction=red.get(f"out{i}", 1))
    pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if o.requires_grad]
    if not pairs:
        return
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    rpairs = [(r, g.double()) for r, o, g in zip(refs, outs, grads, strict=True) if o.requires_grad]
    torch.autograd.backward([r for r, _ in rpairs], [g for _, g in rpairs])
    for i, (t, d) in enumerate(zip(leaves, d_leaves, strict=True)):
        if not t.requires_grad:
            continue
        assert t.grad is not None, f"{what} leaf {i} got no gradient"
        assert t.grad.dtype == t.dtype, f"{what} grad{i} dtype {t.grad.dtype} != {t.dtype}"
        assert_close_rel(t.grad, d.grad, tol, f"{what} grad{i}", reduction=red.get(f"grad{i}", 1))
