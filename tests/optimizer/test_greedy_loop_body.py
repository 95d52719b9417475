"""The body of the CUDA-graph greedy loop, run eagerly on the CPU (the capture needs a GPU;
the body is what it captures): the Triton tail (one kernel, interpreter) and the PyTorch
tail give the tokens of the plain loop, with eos masking below ``block``, finished rows and
the counters advanced once a token."""

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("transformers")

from ryzen_opt.kernels.triton import _common  # noqa: E402
from ryzen_opt.optimization import families  # noqa: E402
from ryzen_opt.optimization.fastpaths.decoder import (  # noqa: E402
    GraphStepper,
    Stepper,
    TritonGraphStepper,
)
from tests.optimizer.hf_models import tiny  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _common.INTERPRET, reason="the Triton steps on CPU tensors need TRITON_INTERPRET=1"
)


def _run_body(stepper, ids, t0, n, eos, pad, block, finished):
    stepper.eos.fill_(-1)
    stepper.eos[: eos.numel()] = eos
    stepper.eos_mask.zero_()
    stepper.eos_mask[eos] = True
    stepper.block.fill_(block)
    stepper.pad.fill_(pad)
    stepper._counters.zero_()
    stepper.t.fill_(t0)
    stepper.ids.copy_(ids)
    stepper.finished.copy_(finished)
    for _ in range(n):
        stepper._loop_body()
    return stepper.tokens[:, :n].clone(), stepper.finished.clone(), stepper._counters.tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_loop_body_gives_the_plain_loops_tokens(family):
    model = tiny(family).eval()
    fam, why = families.find(model)
    assert why is None, why
    layout = fam.layout(model)
    batch, prompt, n = 3, 5, 6
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    first = out.logits[:, -1].argmax(-1)
    # the eos id: a token row 1 produces unmasked at its third step
    plain = Stepper(layout, batch, 32)
    plain.load(out.past_key_values, prompt, torch.zeros(batch, dtype=torch.int64))
    free, _ = plain.greedy(first, prompt, n, None, 0, torch.zeros(batch, dtype=torch.bool))
    eos = free[1, 2:3].clone()
    finished = torch.tensor([False, False, True])
    results = []
    for cls in (Stepper, GraphStepper, TritonGraphStepper):
        s = cls(layout, batch, 32)
        s.load(out.past_key_values, prompt, torch.zeros(batch, dtype=torch.int64))
        if cls is Stepper:
            toks, steps = s.greedy(first, prompt, n, eos, 0, finished.clone(), block=2)
            results.append(toks)
            continue
        toks, fin, counters = _run_body(s, first, prompt, n, eos, 0, 2, finished)
        assert counters == [prompt + n, n, n]
        assert torch.equal(fin, finished | torch.isin(toks, eos).any(1))
        results.append(toks[:, :steps])
    assert torch.equal(results[1], results[0]) and torch.equal(results[2], results[0])
    assert torch.isin(results[0][:, :2], eos).sum() == 0  # masked below block
    assert (results[0][2] == 0).all()  # the row finished before the call emits the pad
