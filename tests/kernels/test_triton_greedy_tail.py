"""The greedy loop's per-token bookkeeping in one Triton kernel against its PyTorch contract
(``reference.greedy_tail``, the code the CUDA-graph loop ran before): argmax ties and NaNs as
``torch.argmax``, eos masking below ``block``, finished rows, the token column, bad input."""

import pytest
import torch

pytest.importorskip("triton")

from ryzen_opt.kernels import reference  # noqa: E402
from ryzen_opt.kernels.triton import _common  # noqa: E402
from ryzen_opt.kernels.triton.greedy_tail import greedy_tail  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not _common.INTERPRET, reason="needs a GPU or TRITON_INTERPRET=1"
)


def _state(batch, vocab, *, dtype=torch.float32, eos=(3,), step=0, block=0, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g).to(dtype)
    eos_t = torch.full((8,), -1, dtype=torch.int64)
    eos_t[: len(eos)] = torch.tensor(eos, dtype=torch.int64)
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[list(eos)] = True
    st = {
        "logits": logits, "eos_mask": mask, "step_no": torch.tensor([step]),
        "block": torch.tensor([block]), "finished": torch.zeros(batch, dtype=torch.bool),
        "pad": torch.tensor([pad]), "eos": eos_t,
        "tokens": torch.full((batch, 5), -7, dtype=torch.int64), "j": torch.tensor([2]),
        "ids": torch.zeros(batch, dtype=torch.int64),
    }
    return {k: v.to(DEVICE) for k, v in st.items()}


def _both(st):
    a = {k: v.clone() for k, v in st.items()}
    b = {k: v.clone() for k, v in st.items()}
    greedy_tail(**a)
    reference.greedy_tail(**b)
    for k in ("finished", "tokens", "ids"):
        assert torch.equal(a[k], b[k]), (k, a[k], b[k])
    return a


@pytest.mark.parametrize("vocab", [1, 7, 64, 65, 97, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_the_reference(vocab, dtype):
    st = _state(3, vocab, dtype=dtype, eos=(0,))
    out = _both(st)
    assert torch.equal(out["tokens"][:, 2], st["logits"].float().argmax(-1))
    assert (out["tokens"][:, [0, 1, 3, 4]] == -7).all()  # only column j written


def test_ties_take_the_first_maximum_across_blocks():
    st = _state(2, 200)
    st["logits"].fill_(-1.0)
    st["logits"][0, [150, 70, 199]] = 5.0  # in the second, fourth block (64 wide) and last
    st["logits"][1, [3, 130]] = 2.0
    out = _both(st)
    assert out["ids"].tolist() == [70, 3]


def test_nan_counts_as_the_maximum_the_first_one_wins():
    st = _state(3, 150)
    st["logits"][0, 120] = float("nan")
    st["logits"][0, 5] = 1e9
    st["logits"][1, [90, 40]] = float("nan")
    st["logits"][2].fill_(float("-inf"))  # all -inf: index 0, as torch.argmax
    out = _both(st)
    assert out["ids"].tolist() == [120, 40, 0]


def test_eos_is_masked_only_below_block_and_finishes_rows():
    st = _state(2, 50, eos=(7, 9), block=3, step=2)
    st["logits"][:, 7] = 100.0
    out = _both(st)  # step 2 < block 3: eos masked
    assert 7 not in out["ids"].tolist() and not out["finished"].any()
    st["step_no"].fill_(3)
    out = _both(st)  # no longer masked: both rows emit eos 7 and finish
    assert out["ids"].tolist() == [7, 7] and out["finished"].all()


def test_finished_rows_emit_the_pad_and_stay_finished():
    st = _state(3, 40, eos=(1,), pad=11)
    st["finished"][1] = True
    st["logits"][:, 1] = -100.0
    out = _both(st)
    assert out["ids"][1] == 11 and out["finished"].tolist() == [False, True, False]


def test_bad_input_names_the_argument():
    st = _state(2, 10)
    with pytest.raises(ValueError, match="ids"):
        greedy_tail(**{**st, "ids": st["ids"].to(torch.int32)})
    with pytest.raises(ValueError, match="eos_mask"):
        greedy_tail(**{**st, "eos_mask": st["eos_mask"][:5]})
    with pytest.raises(ValueError, match="logits"):
        greedy_tail(**{**st, "logits": st["logits"][0]})
    with pytest.raises(ValueError, match="tokens"):
        greedy_tail(**{**st, "tokens": st["tokens"][:1]})
    with pytest.raises(TypeError, match="logits"):
        greedy_tail(**{**st, "logits": st["logits"].double()})
    with pytest.raises(ValueError, match="eos"):
        greedy_tail(**{**st, "eos": torch.zeros(65, dtype=torch.int64, device=DEVICE)})


def test_signed_zeros_and_infinities_rank_as_torch_argmax():
    st = _state(4, 130)
    st["logits"][0].fill_(-5.0)
    # -0.0 and 0.0 are equal: the first (20) wins
    st["logits"][0, [100, 20]] = torch.tensor([-0.0, 0.0], device=DEVICE)
    st["logits"][0, 10] = -0.0
    st["logits"][1].fill_(float("-inf"))
    st["logits"][1, 129] = -3.0
    st["logits"][2, 70] = float("inf")
    st["logits"][3].fill_(-2.0)
    st["logits"][3, 90] = -1.5  # the largest of negatives: their order reverses in the key
    out = _both(st)
    assert out["ids"].tolist() == [10, 129, 70, 90]


def test_the_scratch_is_left_as_found_and_serves_the_next_call():
    from ryzen_opt.kernels.triton.greedy_tail import KEY_EMPTY, tail_scratch

    scratch = tail_scratch(3, DEVICE)
    for seed in range(3):  # one scratch for every call, as a captured loop keeps it
        st = _state(3, 300, seed=seed)  # several blocks a row
        a = {k: v.clone() for k, v in st.items()}
        greedy_tail(**a, scratch=scratch)
        assert torch.equal(a["ids"], st["logits"].argmax(-1)), seed
        assert (scratch[0] == KEY_EMPTY).all() and (scratch[1] == 0).all()


def test_a_wrong_scratch_is_refused():
    from ryzen_opt.kernels.triton.greedy_tail import tail_scratch

    st = _state(2, 10)
    with pytest.raises(ValueError, match="scratch"):
        greedy_tail(**st, scratch=tail_scratch(3, DEVICE))
    with pytest.raises(ValueError, match="scratch"):
        greedy_tail(**st, scratch=tail_scratch(2, DEVICE).int())
