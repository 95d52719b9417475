"""The task family of the instant adapters: arithmetic variants, each described in words.

A task is ``(operator, digits, format)``: ``+``, ``-`` or ``*`` on operands of 1..``digits``
digits (written zero-padded, as :class:`~ryzen_opt.models.tasks.ArithmeticTask` does), and
the answer written in one of three formats, all in the character tokenizer's alphabet:

* ``plain``: ``"34+59="`` -> ``"93"`` (exactly ``ArithmeticTask``'s prompts and answers);
* ``reversed``: the answer's digits last to first, the sign kept in front
  (``"=34+59="`` -> ``"39"``, ``-120`` -> ``"-021"``);
* ``padded``: the answer zero-padded to the widest answer of the task (``+``: digits + 1
  places, ``-``: digits, ``*``: 2 * digits), sign in front (``"==34+59="`` -> ``"093"``).

A format other than ``plain`` is marked in the prompt by a prefix (``"="`` reversed, ``"=="``
padded): without it the prompts of two formats would be the same strings, and no model could
tell from the prompt alone which answer is wanted. The descriptions never go through the
character tokenizer; they are plain English for the text encoder
(:mod:`ryzen_opt.adapters.text`).

Each task has several paraphrases; the first ``TRAIN_PARAPHRASES`` of each are used in
training, the rest are held out.

The family is a grid: operators ``+`` and ``-``, 2 and 3 digits, the three formats (12 tasks).
:data:`HELD_OUT` is one (operator, format) pair, ``-`` written reversed, at both digit counts;
:data:`SEEN` is the other ten tasks, and they make the adapter library and the base's training
mixture (:mod:`ryzen_opt.adapters.generalist`). So every part of a held-out task is known at
every length: subtraction in the plain and padded formats and the reversed format on sums, each
at 2 and 3 digits. A held-out task asks only for a new combination of known parts, never for a
digit count or format the base has not seen (the earlier family held out 2-digit reversed and
padded sums and differences that no seen task wrote at 2 digits, and every method scored 0% on
them).

Example:
    >>> from ryzen_opt.adapters.tasks import get_task
    >>> t = get_task("add2_rev")
    >>> t.prompt(t.sample("test", 1, seed=0)[0])[:1]
    '='
    >>> t.verify("=34+59=", "39")
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ryzen_opt.models.tasks import ArithmeticTask, Problem

FORMATS = ("plain", "reversed", "padded")
_MARKER = {"plain": "", "reversed": "=", "padded": "=="}
TRAIN_PARAPHRASES = 4  # the first 4 of each task's paraphrases train; the rest are held out

_OP_WORDS = {"+": "add", "-": "sub", "*": "mul"}
_FMT_WORDS = {"plain": "", "reversed": "_rev", "padded": "_pad"}


class FormattedTask(ArithmeticTask):
    """``ArithmeticTask`` with one operator and an answer format (see the module docstring).

    Args:
        digits: operand digits.
        operator: ``"+"``, ``"-"`` or ``"*"``.
        fmt: ``"plain"``, ``"reversed"`` or ``"padded"``.
    """

    def __init__(self, digits: int, operator: str, fmt: str = "plain") -> None:
        if not isinstance(operator, str) or len(operator) != 1:
            raise ValueError(f"operator must be one of '+', '-', '*', got {operator!r}")
        super().__init__(digits, operator)
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        self.fmt = fmt
        self.marker = _MARKER[fmt]

    @property
    def name(self) -> str:
        """``add3_rev``-style name: operator word, digits, format suffix."""
        return f"{_OP_WORDS[self.operators[0]]}{self.digits}{_FMT_WORDS[self.fmt]}"

    @property
    def width(self) -> int:
        """Digits of a padded answer: the widest answer's magnitude."""
        op = self.operators[0]
        return {"+": self.digits + 1, "-": self.digits, "*": 2 * self.digits}[op]

    def prompt(self, p: Problem) -> str:
        return self.marker + super().prompt(p)

    def answer_text(self, p: Problem) -> str:  # type: ignore[override]
        sign, mag = ("-", str(-p.answer)) if p.answer < 0 else ("", str(p.answer))
        if self.fmt == "reversed":
            mag = mag[::-1]
        elif self.fmt == "padded":
            mag = mag.zfill(self.width)
        return sign + mag

    @property
    def prompt_len(self) -> int:
        return super().prompt_len + len(self.marker)

    @property
    def max_answer_len(self) -> int:
        return max(super().max_answer_len, self.width + 2)

    def parse_prompt(self, prompt: str) -> Problem:
        if not isinstance(prompt, str) or not prompt.startswith(self.marker):
            raise ValueError(f"prompt must start with {self.marker!r}, got {prompt!r}")
        rest = prompt[len(self.marker) :]
        if rest.startswith("="):
            raise ValueError(f"prompt has the wrong format marker for {self.fmt}: {prompt!r}")
        return super().parse_prompt(rest)

    def verify(self, prompt: str, completion: str) -> bool:
        ans = self.extract_answer(completion)
        return ans is not None and ans == self.answer_text(self.parse_prompt(prompt))

    def to_dict(self) -> dict:
        return {**super().to_dict(), "format": self.fmt, "name": self.name}


@dataclass(frozen=True)
class TaskSpec:
    """One task of the family: its name, the task itself and its paraphrases."""

    name: str
    task: FormattedTask
    paraphrases: tuple[str, ...]

    @property
    def train_descriptions(self) -> tuple[str, ...]:
        return self.paraphrases[:TRAIN_PARAPHRASES]

    @property
    def heldout_descriptions(self) -> tuple[str, ...]:
        return self.paraphrases[TRAIN_PARAPHRASES:]


_NUM = {2: "two", 3: "three", 4: "four"}
_OPS = {
    "+": ("add", "sum of", "addition", "plus", "adding"),
    "-": ("subtract", "difference of", "subtraction", "minus", "subtracting"),
    "*": ("multiply", "product of", "multiplication", "times", "multiplying"),
}
_FMT = {
    "plain": ("", "written normally", "as an ordinary number", "in the usual order", "plainly"),
    "reversed": (
        "with the digits reversed",
        "written backwards",
        "in reverse digit order",
        "last digit first",
        "with its digits in reverse",
    ),
    "padded": (
        "zero-padded to full width",
        "padded with leading zeros",
        "written with leading zeros to a fixed width",
        "left-filled with zeros",
        "with zero padding in front",
    ),
}


def _paraphrases(op: str, digits: int, fmt: str) -> tuple[str, ...]:
    verb, noun_of, noun, infix, gerund = _OPS[op]
    n = _NUM[digits]
    f = _FMT[fmt]

    def tail(i: int) -> str:
        return f" {f[i]}" if f[i] else ""

    out = (
        f"{verb} two {n}-digit numbers{tail(0)}",
        f"give the {noun_of} two numbers with up to {digits} digits, answer {f[1] or 'as is'}",
        f"{noun} of {n}-digit integers; write the result {f[2]}",
        f"compute a {infix} b for {n} digit operands, output {f[3]}",
        # held out: a new sentence shape for the same words
        f"{gerund} numbers of {n} digits, result {f[4]}",
        f"a {n}-digit {noun} problem: the answer {f[1] or 'as is'}",
    )
    return tuple(" ".join(s.split()) for s in out)


def _spec(op: str, digits: int, fmt: str) -> TaskSpec:
    t = FormattedTask(digits, op, fmt)
    return TaskSpec(t.name, t, _paraphrases(op, digits, fmt))


# Seen tasks: the library (one trained LoRA and one SVF expert each) and the base's mixture.
# Every cell of the grid but the held-out pair. On the default checkpoint (3-digit + - *, plain)
# each scores 0-18% (validation, 128 problems: add3 18%, sub3 9%, every other 0-1%), so the base
# and each adapter have something to learn. add4 and mul2 (in the earlier family) are gone:
# rank-16 LoRAs took them only to 4% and 21%, they share no part with a held-out task, and
# their LoRAs, experts and evaluations cost a fifth of the training time.
SEEN: tuple[TaskSpec, ...] = (
    _spec("+", 2, "plain"),
    _spec("+", 2, "reversed"),
    _spec("+", 2, "padded"),
    _spec("+", 3, "plain"),
    _spec("+", 3, "reversed"),
    _spec("+", 3, "padded"),
    _spec("-", 2, "plain"),
    _spec("-", 2, "padded"),
    _spec("-", 3, "plain"),
    _spec("-", 3, "padded"),
)
# Held out: subtraction written reversed. Subtraction is seen in two formats and the reversed
# format on two sums, at both digit counts; only the pair is new. One pair at two lengths
# rather than a second pair (say + padded at 2 digits): a second pair would take its task out
# of the library and the base, leaving that format seen at one length for that operator.
HELD_OUT: tuple[TaskSpec, ...] = (
    _spec("-", 2, "reversed"),
    _spec("-", 3, "reversed"),
)
ALL: tuple[TaskSpec, ...] = SEEN + HELD_OUT


def get_task(name: str) -> FormattedTask:
    """The family's task called ``name`` (e.g. ``"add3_rev"``); raises naming the known ones."""
    return get_spec(name).task


def get_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` called ``name``."""
    for s in ALL:
        if s.name == name:
            return s
    raise ValueError(f"name must be a task of the family {[s.name for s in ALL]}, got {name!r}")


def names(specs: Sequence[TaskSpec] = ALL) -> list[str]:
    return [s.name for s in specs]
