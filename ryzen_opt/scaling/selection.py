"""Choosing one of n candidates: verifier, votes, scores.

Every function takes per-candidate lists and returns the chosen index. Ties are broken by the
model's mean log-probability, then by the lower index, so a choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

# verifier: the programmatic checker; majority: self-consistency over extracted answers;
# weighted_vote: answers weighted by the learned verifier's score (by the checker's 0/1
# verdict when there is no learned verifier); learned: the learned verifier's top score;
# logprob: the model's own mean token log-probability.
STRATEGIES = ("verifier", "majority", "weighted_vote", "learned", "logprob")


def _check(n: int, **lists: Sequence) -> None:
    if n < 1:
        raise ValueError("there must be at least one candidate to choose from")
    for name, xs in lists.items():
        if len(xs) != n:
            raise ValueError(f"{name} has {len(xs)} entries, expected one per candidate ({n})")


def _best(indices: Sequence[int], key: Sequence[float]) -> int:
    # Highest key, lowest index on ties.
    return min(indices, key=lambda i: (-key[i], i))


def select_max(scores: Sequence[float], mean_logprobs: Sequence[float] | None = None) -> int:
    """Index of the highest score (ties: higher mean log-probability, then lower index).

    Args:
        scores: one score per candidate.
        mean_logprobs: tie-breaker, or None.

    Returns:
        The chosen index.

    Example:
        >>> select_max([0.1, 0.9, 0.9], [0.0, -2.0, -1.0])
        2
    """
    n = len(scores)
    lp = [0.0] * n if mean_logprobs is None else mean_logprobs
    _check(n, mean_logprobs=lp)
    return min(range(n), key=lambda i: (-scores[i], -lp[i], i))


def select_verified(verified: Sequence[bool], mean_logprobs: Sequence[float]) -> int:
    """A verified candidate if any (the most likely one), else the most likely candidate.

    Args:
        verified: the programmatic verifier's verdict per candidate.
        mean_logprobs: the model's mean token log-probability per candidate.

    Returns:
        The chosen index; it is verified whenever any candidate is.

    Example:
        >>> select_verified([False, True, True], [0.0, -3.0, -1.0])
        2
    """
    n = len(verified)
    _check(n, mean_logprobs=mean_logprobs)
    ok = [i for i in range(n) if verified[i]]
    return _best(ok or range(n), mean_logprobs)


def select_weighted_vote(
    answers: Sequence[str | None], weights: Sequence[float], mean_logprobs: Sequence[float]
) -> int:
    """Sum ``weights`` per extracted answer; return the best member of the heaviest answer.

    Candidates without an answer (``None``) do not vote; if no candidate has one, the most
    likely candidate is returned. Ties between answers go to the one with more votes, then
    the one whose best member is more likely.

    Args:
        answers: the answer each candidate states, or None.
        weights: each candidate's vote weight (1.0 each for a plain majority vote).
        mean_logprobs: the model's mean token log-probability per candidate.

    Returns:
        The chosen index.

    Example:
        >>> select_weighted_vote(["7", "5", "5"], [0.9, 0.2, 0.3], [0, 0, 0])
        0
    """
    n = len(answers)
    _check(n, weights=weights, mean_logprobs=mean_logprobs)
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(answers):
        if a is not None:
            groups.setdefault(a, []).append(i)
    if not groups:
        return _best(range(n), mean_logprobs)
    reps = {a: _best(members, mean_logprobs) for a, members in groups.items()}

    def rank(a: str) -> tuple[float, int, float, int]:
        members = groups[a]
        return (-sum(weights[i] for i in members), -len(members), -mean_logprobs[reps[a]], reps[a])

    return reps[min(groups, key=rank)]


def select_majority(answers: Sequence[str | None], mean_logprobs: Sequence[float]) -> int:
    """Self-consistency: the most frequent extracted answer (see :func:`select_weighted_vote`).

    Args:
        answers: the answer each candidate states, or None.
        mean_logprobs: the model's mean token log-probability per candidate (tie-breaker).

    Returns:
        The index of the most likely candidate stating the mode.

    Example:
        >>> select_majority(["12", "13", "13", None], [0.0, -1.0, -0.5, 0.0])
        2
    """
    return select_weighted_vote(answers, [1.0] * len(answers), mean_logprobs)
