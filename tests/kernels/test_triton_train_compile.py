"""The training ops are torch.library custom ops with fake kernels and autograd: opcheck
validates schema, fake (meta) implementation and autograd registration, and torch.compile
traces each as one node in forward and one in backward."""

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels.triton import training  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402
from tests.kernels.train_check import DEVICE, leaf  # noqa: E402


def _cases():
    f32 = torch.float32
    x, r, w, b = (
        leaf(3, 9, dtype=f32),
        leaf(3, 9, dtype=f32),
        leaf(9, dtype=f32),
        leaf(9, dtype=f32),
    )
    q, k = leaf(1, 2, 5, 8, dtype=f32), leaf(1, 1, 5, 8, dtype=f32)
    cs = torch.randn(1, 5, 8, device=DEVICE)
    hid, wv = leaf(6, 8, dtype=f32), leaf(20, 8, dtype=f32)
    lab = torch.randint(0, 20, (6,), device=DEVICE)
    lab[2] = -100
    ops = torch.ops.ryzen_opt
    return [
        (
            ops.train_linear_cross_entropy,
            (hid, wv, lab, leaf(20, dtype=f32), -100, 4, True, True, True),
        ),
        (ops.train_linear_cross_entropy, (hid, wv, lab, None, -100, 4, False, False, False)),
        (ops.train_rms_norm, (x, r, w, 1e-6)),
        (ops.train_rms_norm, (x, None, None, 1e-6)),
        (ops.train_layer_norm, (x, r, w, b, 1e-5)),
        (ops.train_layer_norm, (x, None, w, None, 1e-5)),
        (ops.train_swiglu, (x, r)),
        (ops.train_gelu, (x, "tanh")),
        (ops.train_rotary, (q, k, cs, cs)),
        (
            ops.train_attention,
            (
                leaf(1, 2, 17, 16, dtype=f32),
                leaf(1, 1, 20, 16, dtype=f32),
                leaf(1, 1, 20, 16, dtype=f32),
                True,
                0.25,
            ),
        ),
    ]


@pytest.mark.parametrize("i", range(10))
def test_opcheck_schema_fake_and_autograd(i):
    op, args = _cases()[i]
    torch.library.opcheck(
        op,
        args,
        test_utils=(
            "test_schema",
            "test_autograd_registration",
            "test_faketensor",
            "test_aot_dispatch_dynamic",
        ),
    )


def test_public_ops_dispatch_to_the_custom_ops():
    # Under FakeTensorMode only the fake kernels run: the public functions reach the ops.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        x = mode.from_tensor(torch.empty(4, 16, device=DEVICE, dtype=torch.bfloat16))
        w = mode.from_tensor(torch.empty(16, device=DEVICE, dtype=torch.bfloat16))
        y, h = training.rms_norm_residual(x, x, w, 1e-6)
        assert y.shape == h.shape == (4, 16) and y.dtype == torch.bfloat16
        assert training.swiglu(x, x).shape == (4, 16)
        assert training.gelu(x).shape == (4, 16)


@pytest.mark.gpu
def test_training_step_of_the_ops_compiles_to_one_node_each():
    torch.manual_seed(0)
    dt = torch.bfloat16
    mk = lambda *s: torch.nn.Parameter(torch.randn(*s, device="cuda", dtype=dt) * 0.05)
    w_norm, w_gate, w_up, w_down, w_head = (
        mk(256),
        mk(512, 256),
        mk(512, 256),
        mk(256, 512),
        mk(1000, 256),
    )

    def step(x, labels):
        y, h = training.rms_norm_residual(x, x, w_norm, 1e-6)
        m = training.swiglu(y @ w_gate.t(), y @ w_up.t()) @ w_down.t()
        y, _ = training.rms_norm_residual(m, h, w_norm, 1e-6)
        return training.linear_cross_entropy(y, w_head, labels)

    x = torch.randn(512, 256, device="cuda", dtype=dt, requires_grad=True)
    labels = torch.randint(0, 1000, (512,), device="cuda")
    eager = step(x, labels)
    eager.backward()
    grads = [t.grad.clone() for t in (x, w_norm, w_head)]
    for t in (x, w_norm, w_head):
        t.grad = None
    compiled = torch.compile(step, fullgraph=True)(x, labels)
    compiled.backward()
    # Inductor compiles the matmuls and glue around the ops: bf16 agreement, not bitwise.
    assert_close_rel(compiled, eager, TOL[dt], "loss")
    for g, t in zip(grads, (x, w_norm, w_head), strict=True):
        assert_close_rel(t.grad, g, TOL[dt], "grad")


_NO_INTERPRETER = """
import torch
from ryzen_opt.kernels.triton import training as T

x = torch.randn(2, 8)
q = torch.randn(1, 2, 3, 8)
c = torch.randn(1, 3, 8)
lab = torch.zeros(2, dtype=torch.long)
calls = {
    "swiglu": (x, x),
    "gelu": (x,),
    "rms_norm_residual": (x, x, None, 1e-6),
    "layer_norm_residual": (x, None, None, None, 1e-5),
    "rotary": (q, q, c, c),
    "linear_cross_entropy": (x, torch.randn(5, 8), lab),
    "attention": (q, q, q),
}
for name, args in calls.items():
    reason = T.SUPPORTS[name](*args)
    assert reason and "on cpu" in reason, (name, reason)
    try:
        getattr(T, name)(*args)
    except ValueError as e:
        assert "on cpu; the triton backend needs CUDA tensors" in str(e), (name, e)
    else:
        raise AssertionError(name + " ran on CPU tensors without the interpreter")
print("ok")
"""


def test_cpu_tensors_without_the_interpreter_raise_naming_the_argument():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _NO_INTERPRETER],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


# The interpreter's numpy exp overflows to inf for sigmoid(-large): the limit 0 is correct.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_compile_traces_each_op_as_one_node_forward_and_backward():
    # AOTAutograd (no code generation, so it runs on the CPU under the interpreter) splits the
    # step into a forward and a backward graph: each op must appear there as its custom op.
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    f32 = torch.float32
    x, r, w = leaf(6, 16, dtype=f32), leaf(6, 16, dtype=f32), leaf(16, dtype=f32)
    wg, wu, head = leaf(24, 16, dtype=f32), leaf(24, 16, dtype=f32), leaf(40, 24, dtype=f32)
    q, k = leaf(1, 2, 6, 8, dtype=f32), leaf(1, 1, 6, 8, dtype=f32)
    cs = torch.randn(1, 6, 8, device=DEVICE)
    labels = torch.randint(0, 40, (6,), device=DEVICE)

    def step(x, r, w, wg, wu, head, q, k):
        y, h = training.rms_norm_residual(x, r, w, 1e-6)
        y, _ = training.layer_norm_residual(y, h, None, None, 1e-5)
        m = training.gelu(training.swiglu(y @ wg.t(), y @ wu.t()), "tanh")
        qr, kr = training.rotary(q, k, cs, cs)
        o = training.attention(qr, kr, kr, causal=True)
        return training.linear_cross_entropy(m, head, labels) + o.sum()

    args = (x, r, w, wg, wu, head, q, k)
    eager = step(*args)
    eager_grads = torch.autograd.grad(eager, args)
    backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)
    compiled = torch.compile(step, backend=backend, fullgraph=True)(*args)
    grads = torch.autograd.grad(compiled, args)
    torch.testing.assert_close(compiled, eager)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e)
    assert len(graphs) == 2
    fw, bw = (str(g.graph) for g in graphs)
    for op in (
        "train_rms_norm",
        "train_layer_norm",
        "train_swiglu",
        "train_gelu",
        "train_rotary",
        "train_attention",
        "train_linear_cross_entropy",
    ):
        assert f"ryzen_opt.{op}.default" in fw, op
    for op in (
        "train_norm_backward",
        "train_swiglu_backward",
        "train_gelu_backward",
        "train_rotary_backward",
        "train_attention_backward",
    ):
        assert f"ryzen_opt.{op}.default" in bw, op


def test_eager_calls_skip_the_dispatcher_forward_and_backward(monkeypatch):
    # With grad: a plain autograd.Function whose backward runs the bare backward function;
    # the backward custom op is never called (it raises here). Without grad: no graph at all.
    from ryzen_opt.kernels.triton.training import _norm_ops, swiglu_op

    def refuse(*a, **k):
        raise AssertionError("the custom op ran on the eager path")

    monkeypatch.setattr(swiglu_op, "_swiglu_backward_op", refuse)
    monkeypatch.setattr(_norm_ops, "norm_backward_op", refuse)
    x = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    y = training.swiglu(x, r)
    assert type(y.grad_fn).__name__.startswith("swiglu_impl_function")
    y.sum().backward()
    assert x.grad is not None and r.grad is not None
    out, _ = training.rms_norm_residual(x, r, w, 1e-6)
    assert type(out.grad_fn).__name__.startswith("rms_norm_impl_function")
    out.sum().backward()
    assert w.grad is not None
    with torch.no_grad():
        assert training.swiglu(x, r).grad_fn is None


def test_eager_calls_bind_no_signature(monkeypatch):
    # The eager autograd.Function takes ctx in forward: Function.apply then skips its
    # per-call inspect.signature binding (tens of microseconds of host time a call).
    import inspect

    def refuse(*a, **k):
        raise AssertionError("inspect.signature ran on the eager path")

    x = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    monkeypatch.setattr(inspect, "signature", refuse)
    y = training.swiglu(x, r)
    out, h = training.rms_norm_residual(x, r, w, 1e-6)
    monkeypatch.undo()
    (y.sum() + out.sum() + h.sum()).backward()
    assert x.grad is not None and r.grad is not None and w.grad is not None


def test_the_traced_path_still_goes_through_the_custom_ops():
    # Under a dispatch mode (what AOT autograd and FakeTensorMode install) the public function
    # calls the custom op: its forward (the bare function) is never reached directly.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ryzen_opt.kernels.triton.training import _common as tc

    assert tc._plain_eager((torch.ones(1),))
    with FakeTensorMode() as mode:
        assert not tc._plain_eager((mode.from_tensor(torch.ones(1)),))
    assert not tc._plain_eager((torch.ones(1).as_subclass(_Sub),))


class _Sub(torch.Tensor):
    pass
