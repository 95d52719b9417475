"""``example_inputs`` in every accepted form (tensor, tuple of positional arguments, dict of
keyword arguments) for every model kind the optimizer serves, and clear errors otherwise.

The transformers decoders are built from tiny configs (random weights, nothing downloaded).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ryzen_opt import KernelOptimizer, optimize
from tests.optimizer.fakes import (
    CountingLauncher,
    fast_config,
    one_thread,
    reference_matmul,
    registered,
    tiny_model,
)

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install ryzen-opt[hf])"
)
from tests.optimizer.test_hf import BUILDERS  # noqa: E402  (needs transformers)

# (3, 7): not the synthetic prefill shape of fast_config (2, 8), so the shapes seen below can
# only come from example_inputs.
IDS = torch.tensor(
    [[5, 7, 11, 13, 17, 19, 23], [2, 3, 5, 8, 13, 21, 34], [1, 4, 9, 16, 25, 36, 49]]
)
MASK = torch.ones_like(IDS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _model(kind):
    torch.manual_seed(0)
    return tiny_model() if kind == "stm" else BUILDERS[kind]("sdpa").eval()


def _forms(kind):
    # A SimpleTransformerModel's forward names its ids ``idx``; transformers' ``input_ids``.
    as_dict = {"idx": IDS} if kind == "stm" else {"input_ids": IDS, "attention_mask": MASK}
    return {"tensor": IDS, "tuple": (IDS,), "dict": as_dict}


KINDS = ["stm", "gpt2", "llama", "qwen2"]
FORMS = ["tensor", "tuple", "dict"]


def _linear_shapes(kind, example, tmp_path):
    cfg = fast_config(tmp_path, backends=("fake_mm",), ops=("linear",))
    with registered("matmul", "fake_mm", CountingLauncher(reference_matmul)):
        plan = KernelOptimizer(cfg).plan(_model(kind), example)
    return {c.shape for s in plan.sites for c in s.cases}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_example_form_measures_the_example_shapes(kind, form, tmp_path):
    shapes = _linear_shapes(kind, _forms(kind)[form], tmp_path)
    rows = {s.split("x")[0] + "x" + s.split("x")[1] for s in shapes}
    # A prefill of the example and one decode step after it, at the example's batch (3) and
    # at the configured decode batches (fast_config: 1 and 2), which generation also runs.
    # GPT-2's only nn.Linear is its head, which (as in generate) sees the last position only.
    prefill = {"3x1"} if kind == "gpt2" else {"3x7"}
    assert rows == prefill | {"3x1", "1x1", "2x1"}, shapes


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_optimize_accepts_every_example_form(kind, form, tmp_path):
    model = _model(kind)
    out = optimize(
        model, example_inputs=_forms(kind)[form], config=fast_config(tmp_path, backends=())
    )
    report = out.optimization_report
    assert type(out) is type(model) and out is not model
    assert report.sites == [] or all(s.cases for s in report.sites)
    with torch.no_grad():
        ref = model(IDS)
        got = out(IDS)
    logits = lambda o: o[0] if isinstance(o, tuple) else o.logits
    assert torch.equal(logits(got), logits(ref))


def test_a_tuple_binds_positionally_like_torch_export(tmp_path):
    # Llama's forward is (input_ids, attention_mask, ...): a two-element tuple is a prompt
    # and its mask. GPT-2's is (input_ids, past_key_values, ...): the same tuple hands the
    # mask over as a cache, which is refused naming the argument.
    shapes = _linear_shapes("llama", (IDS, MASK), tmp_path)
    assert {"x".join(s.split("x")[:2]) for s in shapes} == {"3x7", "3x1", "1x1", "2x1"}
    with pytest.raises(ValueError, match="example_inputs must describe a prompt.*past_key_values"):
        KernelOptimizer(fast_config(tmp_path, backends=())).plan(_model("gpt2"), (IDS, MASK))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ([[1, 2]], TypeError, "example_inputs must be None, a tensor, a tuple"),
        ({1: IDS}, TypeError, "example_inputs as a dict must map"),
        (
            (
                IDS,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
            ),
            TypeError,
            "example_inputs",
        ),
        ({"no_such_argument": IDS}, TypeError, "example_inputs do not fit"),
        ((), TypeError, "example_inputs"),
        ((IDS.float(),), ValueError, "example_inputs: .* must be a 2-D int64/int32"),
        ((IDS + 1000,), ValueError, r"example_inputs: .* ids must lie in \[0, 64\)"),
        ((IDS[:, :0],), ValueError, "example_inputs: .* must not be empty"),
    ],
    ids=["list", "int-key", "too-many", "unknown-key", "empty-tuple", "float", "range", "empty"],
)
def test_bad_example_inputs_raise_naming_example_inputs(kind, bad, error, match, tmp_path):
    if kind != "stm" and match == "example_inputs do not fit":
        # transformers' forward takes **kwargs, so any name binds; the prompt is then missing.
        match = "example_inputs: input_ids must be a"
    with pytest.raises(error, match=match):
        KernelOptimizer(fast_config(tmp_path, backends=())).plan(_model(kind), bad)


def test_a_cache_in_example_inputs_is_refused(tmp_path):
    model = tiny_model()
    _, cache = model(IDS)
    with pytest.raises(ValueError, match="example_inputs must describe a prompt.*kv_cache"):
        optimize(model, example_inputs=(IDS, cache), config=fast_config(tmp_path, backends=()))


def test_hf_attention_mask_of_another_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match="example_inputs: attention_mask"):
        optimize(
            _model("llama"),
            example_inputs={"input_ids": IDS, "attention_mask": MASK[:, :3]},
            config=fast_config(tmp_path, backends=()),
        )


def test_other_modules_take_every_form(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)).eval()
    x = torch.randn(5, 4)
    for example in (x, (x,), {"input": x}):
        out = optimize(net, example_inputs=example, config=fast_config(tmp_path, backends=()))
        assert torch.equal(out(x), net(x))
