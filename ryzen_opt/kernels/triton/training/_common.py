"""Helpers shared by the training ops: device and dtype checks, row views, grad flags.

Every op here runs its Triton kernels on CUDA tensors, and on CPU tensors only under
``TRITON_INTERPRET=1`` (CPU CI). On CPU tensors without the interpreter the launchers raise
``ValueError`` naming the argument: they never fall back silently. The caller (for training,
``optimize_training``) asks ``supports(...)`` first and uses the reference when it says no.
"""

from __future__ import annotations

import torch

from ryzen_opt.kernels.triton import _common

KERNEL_DTYPES = _common.KERNEL_DTYPES
INTERPRET = _common.INTERPRET
# Host-side integer helpers (``triton.cdiv`` costs microseconds from Python).
cdiv = _common.cdiv
next_pow2 = _common.next_pow2


def check_device(name: str, t: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming ``name`` if ``t`` cannot feed a Triton kernel here."""
    if t is not None:
        _common.check_device(name, t)


def check_dtype(name: str, t: torch.Tensor | None) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``t`` is float16, bfloat16 or float32."""
    if t is not None and t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} is {t.dtype}; the triton kernels take float16, bfloat16, float32")


def reason(op: str, **tensors: torch.Tensor | None) -> str | None:
    """The first device or dtype reason why ``tensors`` cannot feed ``op``'s kernels."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if r := _common.device_reason(name, t):
            return r
        if t.is_floating_point() and t.dtype not in KERNEL_DTYPES:
            return f"{name} is {t.dtype}; the triton {op} takes float16, bfloat16 or float32"
    return _common.available()


def rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as ``(rows, n)`` with a unit last stride (a copy only when a view cannot be)."""
    t2 = t.reshape(-1, n)
    return t2 if n <= 1 or t2.stride(-1) == 1 else t2.contiguous()


def flat_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two same-shape tensors as ``(rows, n)`` row views with unit last stride.

    Contiguous tensors become a single row of ``numel`` elements (one flat launch); others
    keep their rows (a chunk of a fused projection keeps its row stride, no copy).
    """
    if a.is_contiguous() and b.is_contiguous():
        return a.reshape(1, -1), b.reshape(1, -1)
    n = a.shape[-1] if a.dim() else 1
    return rows(a, n), rows(b, n)


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will ask for a gradient of any of ``tensors``."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    )


def sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of ``t``'s GPU (4 under the interpreter)."""
    return _common.num_sms(_common.device_index(t))


class TrainingOp:
    """A training op callable two ways, over the same forward and backward functions.

    ``torch.compile`` traces ``op`` (a ``torch.library`` custom op with its autograd formula
    registered here). An eager call skips the custom-op dispatcher and goes through a plain
    ``torch.autograd.Function`` whose forward takes ``ctx``: on an H200's host the dispatcher
    cost ~0.3 ms a call, several times the GPU time of a norm
    (``bench/results/h200/train_op_host_profile.txt``). Without grad (or with no input that
    needs one) the forward runs bare. A backward formula calls
    its backward custom op through :func:`call`, which runs the bare function on the eager
    path (``ctx.eager``) and the custom op when traced.

    Args:
        op: the custom op (``torch.library.custom_op``), its fake registered.
        forward: the function ``op`` wraps (same arguments, same outputs).
        setup_context, backward: ``register_autograd``'s pair.
    """

    def __init__(self, op, forward, setup_context, backward) -> None:
        op.register_autograd(backward, setup_context=setup_context)
        self.op, self.forward = op, forward

        def eager_forward(ctx, *inputs):
            ctx.eager = True
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        def eager_setup_context(ctx, inputs, output):
            ctx.eager = True
            setup_context(ctx, inputs, output)

        name = forward.__name__.strip("_") + "_function"
        # The ctx-taking form: with a separate setup_context, Function.apply binds every
        # call's arguments through inspect.signature (30-45 us a call on a CPU host). The
        # functorch transforms (torch.func.grad, ...) need the separate form: self.func_function.
        self.function = type(
            name,
            (torch.autograd.Function,),
            {"forward": staticmethod(eager_forward), "backward": staticmethod(backward)},
        )
        self.func_function = type(
            name,
            (torch.autograd.Function,),
            {
                "forward": staticmethod(forward),
                "setup_context": staticmethod(eager_setup_context),
                "backward": staticmethod(backward),
            },
        )

    def __call__(self, *args):
        if not _plain_eager(args):
            return self.op(*args)  # traced, or under a fake/meta/functional mode
        if not wants_grad(*args):
            return self.forward(*args)
        if torch._C._are_functorch_transforms_active():
            return self.func_function.apply(*args)
        return self.function.apply(*args)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(args) -> bool:
    """Whether this call runs on real tensors outside any tracing: not while dynamo
    compiles, with no dispatch mode active (FakeTensorMode, AOT's functionalization) and
    every tensor argument a plain tensor (not a fake or other subclass)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


def call(ctx, op, forward, *args):
    """A backward custom op from a backward formula: ``forward(*args)`` (the function ``op``
    wraps, no dispatcher) on :class:`TrainingOp`'s eager path, ``op(*args)`` otherwise."""
    return forward(*args) if getattr(ctx, "eager", False) else op(*args)
