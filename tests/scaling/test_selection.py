"""Selection strategies on hand-made and random candidate lists."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ryzen_opt.scaling import (
    select_majority,
    select_max,
    select_verified,
    select_weighted_vote,
)


def test_majority_picks_the_mode_and_its_most_likely_member():
    answers = ["12", "13", "13", None, "12", "13"]
    lp = [0.0, -3.0, -1.0, 5.0, -0.5, -2.0]
    assert select_majority(answers, lp) == 2


def test_majority_ties_go_to_the_more_likely_answer_then_the_lower_index():
    assert select_majority(["a", "b", "b", "a"], [-1.0, -0.5, -2.0, -3.0]) == 1
    assert select_majority(["a", "b"], [0.0, 0.0]) == 0


def test_majority_with_no_answers_falls_back_to_the_most_likely():
    assert select_majority([None, None, None], [-2.0, -1.0, -3.0]) == 1


def test_majority_picks_the_mode_on_random_votes():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        answers = [rng.choice(["1", "2", "3", None]) for _ in range(n)]
        lp = [rng.uniform(-3, 0) for _ in range(n)]
        i = select_majority(answers, lp)
        counts = Counter(a for a in answers if a is not None)
        if counts:
            assert counts[answers[i]] == max(counts.values())
        else:
            assert lp[i] == max(lp)


def test_weighted_vote_can_overrule_the_majority():
    answers = ["7", "5", "5"]
    assert select_majority(answers, [0, 0, 0]) == 1
    assert select_weighted_vote(answers, [0.9, 0.2, 0.3], [0, 0, 0]) == 0


def test_verified_choice_is_verified_whenever_one_is():
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 10)
        ok = [rng.random() < 0.2 for _ in range(n)]
        lp = [rng.uniform(-3, 0) for _ in range(n)]
        i = select_verified(ok, lp)
        assert ok[i] == any(ok)
        pool = [j for j in range(n) if ok[j]] or range(n)
        assert lp[i] == max(lp[j] for j in pool)


def test_select_max_breaks_ties_by_log_probability():
    assert select_max([0.1, 0.9, 0.9], [0.0, -2.0, -1.0]) == 2
    assert select_max([1.0, 1.0]) == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda: select_majority([], []),
        lambda: select_majority(["1"], [0.0, 1.0]),
        lambda: select_weighted_vote(["1", "2"], [1.0], [0.0, 0.0]),
        lambda: select_verified([True], []),
    ],
)
def test_mismatched_or_empty_lists_raise(call):
    with pytest.raises(ValueError, match="candidate"):
        call()
