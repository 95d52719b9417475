"""Tiny models and a letter-level verifier for the scaling tests."""

from __future__ import annotations

import pytest
import torch

from ryzen_opt.models import ModelConfig, SimpleTransformerModel
from ryzen_opt.scaling import TaskVerifier

TINY = dict(vocab_size=32, embedding_dim=32, num_heads=2, num_layers=1, ff_dim=64, max_seq_len=32)
EOS = 2
GOOD = set("ghijklmn")  # completions starting with one of these letters count as correct


class LetterTokenizer:
    """Id i <-> chr(ord('a') + i); EOS=2 ends a completion and is not written."""

    EOS = EOS

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            if int(i) == EOS:
                break
            out.append(chr(ord("a") + int(i)))
        return "".join(out)


def first_letter_good(prompt: str, completion: str) -> bool:
    return bool(completion) and completion[0] in GOOD


def first_letter(completion: str) -> str | None:
    return completion[:1] or None


def make_tiny(seed: int = 0, sharpen: float = 1.0, **over) -> SimpleTransformerModel:
    torch.manual_seed(seed)
    model = SimpleTransformerModel(ModelConfig(**{**TINY, **over})).eval()
    if sharpen != 1.0:
        with torch.no_grad():
            model.tok_emb.weight.mul_(sharpen)
    return model


@pytest.fixture
def tiny_model() -> SimpleTransformerModel:
    # sharpen=5: next-token distributions far from uniform, so candidates share prefixes
    # and answers repeat (voting has something to count) while still differing.
    return make_tiny(sharpen=5.0)


@pytest.fixture
def letter_verifier() -> TaskVerifier:
    return TaskVerifier(first_letter_good, LetterTokenizer(), first_letter)


@pytest.fixture
def prompts() -> list[str]:
    return ["bcdef", "hello", "qrstu", "abcab", "zzzyx", "mnopq"]
