import pytest
import torch

from ryzen_opt.models.tasks import ArithmeticTask, CharTokenizer, Problem


def test_verify_accepts_exactly_the_right_answer():
    t = ArithmeticTask(digits=3, operators="+-*")
    assert t.verify("482+917=", "1399")
    assert t.verify("482+917=", " 1399 ")
    assert not t.verify("482+917=", "1398")
    assert not t.verify("482+917=", "01399")
    assert not t.verify("482+917=", "")
    assert t.verify("017-482=", "-465")
    assert t.verify("012*011=", "132")


def test_tokenizer_round_trip_and_vocabulary_bounds():
    tok = CharTokenizer()
    ids = tok.encode("12+3=")
    assert ids[0] == tok.BOS and max(ids) < tok.vocab_size <= 2048
    assert tok.decode(ids) == "12+3="
    assert tok.decode([*tok.encode("45", bos=False), tok.EOS, 5, 6]) == "45"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("1/2")


def test_splits_are_disjoint_and_seeded():
    t = ArithmeticTask(digits=2, operators="+-")
    train = set(t.sample("train", 3000, seed=0))
    val = set(t.sample("validation", 300, seed=0))
    test = set(t.sample("test", 300, seed=0))
    assert not train & val and not train & test and not val & test
    assert t.sample("test", 50, seed=3) == t.sample("test", 50, seed=3)
    assert t.sample("test", 50, seed=3) != t.sample("test", 50, seed=4)
    assert all(t.split_of(p) == "validation" for p in val)


def test_every_prompt_of_a_task_has_one_length():
    t = ArithmeticTask(digits=4, operators="+*")
    ids = t.encode_prompts(t.sample("train", 64, seed=1))
    assert ids.shape == (64, t.prompt_len)


def test_training_targets_cover_answer_and_eos_only():
    t = ArithmeticTask(digits=3)
    p = Problem(482, "+", 917)
    x, y = t.encode_training([p])
    tok = t.tokenizer
    kept = y[0][y[0] != -100].tolist()
    assert kept == tok.encode("1399", bos=False) + [tok.EOS]
    # x predicts y: the token before the first target is '='.
    first = int((y[0] != -100).nonzero()[0])
    assert tok.decode(x[0, first : first + 1]) == "="


def test_max_answer_len_fits_every_answer():
    t = ArithmeticTask(digits=3, operators="+-*")
    for p in [Problem(999, "*", 999), Problem(0, "-", 999), Problem(999, "+", 999)]:
        assert len(str(p.answer)) + 1 <= t.max_answer_len


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(digits=0), "digits"),
        (dict(operators="/"), "operators"),
        (dict(operators="++"), "operators"),
        (dict(digits=True), "digits"),
    ],
)
def test_bad_task_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        ArithmeticTask(**kw)


def test_bad_prompt_and_split_raise():
    t = ArithmeticTask(digits=3)
    with pytest.raises(ValueError, match="prompt"):
        t.verify("48+917=", "965")
    with pytest.raises(ValueError, match="split"):
        t.sample("dev", 3, seed=0)
    with pytest.raises(ValueError, match="n must"):
        t.sample("train", -1, seed=0)


def test_encode_prompts_is_int64():
    t = ArithmeticTask()
    assert t.encode_prompts(t.sample("test", 2, 0)).dtype == torch.int64
