"""A verifiable task: integer arithmetic written as text (``"482+917="`` -> ``"1399"``).

Operands are written zero-padded to ``digits`` places so every prompt of a task has the same
length (batched generation needs no padding); answers are written plainly (``"-35"``,
``"1399"``) and end with EOS. The splits are disjoint by construction: each problem
``(a, op, b)`` belongs to exactly one split, chosen by a fixed hash of the problem, and the
seeded generators draw only problems of the requested split.

Example:
    >>> from ryzen_opt.models.tasks import ArithmeticTask
    >>> task = ArithmeticTask(digits=3, operators="+")
    >>> task.verify("482+917=", "1399")
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

SPLITS = ("train", "validation", "test")
# Share of the problem space per split (by hash bucket out of 100).
_SPLIT_BUCKETS = {"train": range(0, 90), "validation": range(90, 95), "test": range(95, 100)}


class CharTokenizer:
    """Character tokenizer for the arithmetic task: 3 specials + ``0-9 + - * =``.

    Ids: ``PAD=0, BOS=1, EOS=2``, then the characters in order. 17 ids in all, so it fits
    any model vocabulary of at least 17.
    """

    PAD, BOS, EOS = 0, 1, 2
    CHARS = "0123456789+-*="

    def __init__(self) -> None:
        self._to_id = {c: i + 3 for i, c in enumerate(self.CHARS)}
        self._to_char = {i: c for c, i in self._to_id.items()}

    @property
    def vocab_size(self) -> int:
        return 3 + len(self.CHARS)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Ids of ``text`` (with BOS first if ``bos``); unknown characters raise."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        bad = sorted({c for c in text if c not in self._to_id})
        if bad:
            raise ValueError(f"text has characters outside the vocabulary {self.CHARS!r}: {bad}")
        ids = [self._to_id[c] for c in text]
        return [self.BOS, *ids] if bos else ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``, stopping at the first EOS; specials and unknown ids are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == self.EOS:
                break
            c = self._to_char.get(int(i))
            if c is not None:
                out.append(c)
        return "".join(out)


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        if self.op == "+":
            return self.a + self.b
        if self.op == "-":
            return self.a - self.b
        return self.a * self.b


def _split_of(p: Problem) -> str:
    h = hashlib.blake2b(f"{p.a}{p.op}{p.b}".encode(), digest_size=4).digest()
    bucket = int.from_bytes(h, "little") % 100
    return next(s for s, r in _SPLIT_BUCKETS.items() if bucket in r)


class ArithmeticTask:
    """Multi-digit integer arithmetic with a programmatic verifier.

    Args:
        digits: operands have 1..``digits`` digits (written zero-padded to ``digits``).
        operators: any of ``"+"``, ``"-"``, ``"*"`` (a string or a sequence).
    """

    def __init__(self, digits: int = 3, operators: str | Sequence[str] = "+") -> None:
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 9:
            raise ValueError(f"digits must be an int in [1, 9], got {digits!r}")
        ops = tuple(operators)
        if not ops or any(o not in "+-*" for o in ops) or len(set(ops)) != len(ops):
            raise ValueError(f"operators must be distinct, from '+', '-', '*', got {operators!r}")
        self.digits = digits
        self.operators = ops
        self.tokenizer = CharTokenizer()

    # -- text -------------------------------------------------------------------------------
    def prompt(self, p: Problem) -> str:
        return f"{p.a:0{self.digits}d}{p.op}{p.b:0{self.digits}d}="

    @staticmethod
    def answer_text(p: Problem) -> str:
        return str(p.answer)

    @property
    def prompt_len(self) -> int:
        """Tokens in an encoded prompt (BOS included); the same for every problem."""
        return 1 + 2 * self.digits + 2

    @property
    def max_answer_len(self) -> int:
        """Tokens in the longest answer, EOS included."""
        top = 10**self.digits - 1
        longest = max(len(str(Problem(top, o, top).answer)) for o in self.operators)
        return max(longest, self.digits + 1 if "-" in self.operators else 0) + 1

    def parse_prompt(self, prompt: str) -> Problem:
        """The problem a prompt states; raises ValueError naming the prompt if malformed."""
        d = self.digits
        if (
            not isinstance(prompt, str)
            or len(prompt) != 2 * d + 2
            or prompt[-1] != "="
            or prompt[d] not in self.operators
            or not (prompt[:d].isdigit() and prompt[d + 1 : 2 * d + 1].isdigit())
        ):
            raise ValueError(f"prompt must look like '{'1' * d}+{'2' * d}=', got {prompt!r}")
        return Problem(int(prompt[:d]), prompt[d], int(prompt[d + 1 : 2 * d + 1]))

    @staticmethod
    def extract_answer(completion: str) -> str | None:
        """The answer a completion states (for voting), or None if it states none."""
        text = completion.strip()
        if text.startswith("-"):
            return text if text[1:].isdigit() else None
        return text if text.isdigit() else None

    def verify(self, prompt: str, completion: str) -> bool:
        """True iff ``completion`` is exactly the correct answer to ``prompt``."""
        ans = self.extract_answer(completion)
        return ans is not None and ans == str(self.parse_prompt(prompt).answer)

    # -- data -------------------------------------------------------------------------------
    def sample(self, split: str, n: int, seed: int) -> list[Problem]:
        """``n`` problems of ``split`` drawn with ``seed`` (deterministic, with repeats)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        out: list[Problem] = []
        hi = 10**self.digits
        while len(out) < n:
            m = 2 * (n - len(out)) + 16
            a = rng.integers(0, hi, m)
            b = rng.integers(0, hi, m)
            o = rng.integers(0, len(self.operators), m)
            for ai, bi, oi in zip(a.tolist(), b.tolist(), o.tolist(), strict=True):
                p = Problem(ai, self.operators[oi], bi)
                if _split_of(p) == split:
                    out.append(p)
                    if len(out) == n:
                        break
        return out

    def split_of(self, p: Problem) -> str:
        return _split_of(p)

    def encode_prompts(self, problems: Sequence[Problem]) -> torch.Tensor:
        """``(n, prompt_len)`` int64 ids of the prompts (BOS first)."""
        return torch.tensor([self.tokenizer.encode(self.prompt(p)) for p in problems])

    def encode_training(self, problems: Sequence[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets for next-token training, loss only on the answer and EOS.

        Returns:
            ``(x, y)``, both ``(n, L)`` int64; ``y`` is -100 where no loss is taken.
        """
        seqs, starts = [], []
        for p in problems:
            ids = self.tokenizer.encode(self.prompt(p)) + self.tokenizer.encode(
                self.answer_text(p), bos=False
            )
            seqs.append(ids + [self.tokenizer.EOS])
            starts.append(self.prompt_len)
        width = max(len(s) for s in seqs)
        full = torch.full((len(seqs), width), self.tokenizer.PAD, dtype=torch.long)
        for i, s in enumerate(seqs):
            full[i, : len(s)] = torch.tensor(s)
        x, y = full[:, :-1].clone(), full[:, 1:].clone()
        pos = torch.arange(width - 1)[None, :]
        lens = torch.tensor([len(s) for s in seqs])[:, None]
        start = torch.tensor(starts)[:, None]
        y[(pos < start - 1) | (pos >= lens - 1)] = -100
        return x, y

    def to_dict(self) -> dict:
        return {"name": "arithmetic", "digits": self.digits, "operators": "".join(self.operators)}
