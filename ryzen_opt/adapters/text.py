"""The text encoder of the instant adapters: hashed word and character n-grams.

Why this one: it is offline and has no weights to ship or download; it is the same bytes on
every machine and process (``blake2b``, not Python's salted ``hash``); it encodes a
description in ~0.1 ms; and what tells this family's tasks apart is a handful of content
words (``add``/``subtract``, ``three``, ``reversed``/``zero-padded``) that paraphrases share,
which word and character n-grams catch. The base model's own embeddings cannot serve: its
vocabulary is the 17 characters of the arithmetic task. No installed package ships a
sentence encoder's weights.

A description is lower-cased and cut into words (runs of letters or digits); number words
one to nine are written as digits (``"three-digit"`` and ``"3 digit"`` meet). Features: each
word (weight 1), each pair of neighbouring words (0.5) and each character 3-gram of a word
padded with ``^``/``$`` (0.25), hashed into ``dim`` slots with a hashed sign. The vector is
L2-normalised.

Example:
    >>> from ryzen_opt.adapters.text import HashingTextEncoder
    >>> enc = HashingTextEncoder(dim=256)
    >>> v = enc("add two three-digit numbers")
    >>> v.shape, round(float(v.norm()), 4)
    (torch.Size([256]), 1.0)
"""

from __future__ import annotations

import hashlib
import re

import torch

from ryzen_opt.adapters.config import AdapterError
from ryzen_opt.models.config import short_repr

# A description is a sentence or two; 1000 characters refuses only mistakes (a pasted file).
MAX_DESCRIPTION_CHARS = 1000
_WORD = re.compile(r"[a-z]+|[0-9]+")
_NUMBERS = dict(
    zip(
        ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        "123456789",
        strict=True,
    )
)


def check_description(description: object, argument: str = "description") -> str:
    """``description`` stripped; raises :class:`AdapterError` naming ``argument`` if it is not
    a non-empty ``str`` of at most :data:`MAX_DESCRIPTION_CHARS` characters with a word."""
    if not isinstance(description, str):
        raise AdapterError(f"{argument} must be a str, got {type(description).__name__}")
    text = description.strip()
    if not text:
        raise AdapterError(f"{argument} must not be empty, got {short_repr(description)}")
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise AdapterError(
            f"{argument} must be at most {MAX_DESCRIPTION_CHARS} characters, got {len(text)}"
        )
    if not _WORD.search(text.lower()):
        raise AdapterError(f"{argument} has no word (letters or digits): {short_repr(text)}")
    return text


def words(text: str) -> list[str]:
    """The normalised words of ``text`` (lower case, number words as digits)."""
    return [_NUMBERS.get(w, w) for w in _WORD.findall(text.lower())]


class HashingTextEncoder:
    """Description -> ``(dim,)`` float32 unit vector (see the module docstring).

    Args:
        dim: the embedding size (hash slots).
    """

    def __init__(self, dim: int = 512) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 8:
            raise AdapterError(f"dim must be an int >= 8, got {short_repr(dim)}")
        self.dim = dim
        self._slots: dict[str, tuple[int, float]] = {}  # feature -> (slot, sign), memoised

    def _slot(self, feature: str) -> tuple[int, float]:
        hit = self._slots.get(feature)
        if hit is None:
            h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
            hit = (h % self.dim, 1.0 if (h >> 63) & 1 else -1.0)
            if len(self._slots) < 1 << 16:  # bounded: a server sees arbitrary text
                self._slots[feature] = hit
        return hit

    def features(self, description: str) -> dict[str, float]:
        """``{feature: weight}`` of a description (checked like :func:`check_description`)."""
        ws = words(check_description(description))
        feats: dict[str, float] = {}
        for w in ws:
            feats["w:" + w] = feats.get("w:" + w, 0.0) + 1.0
            padded = f"^{w}$"
            for i in range(len(padded) - 2):
                key = "c:" + padded[i : i + 3]
                feats[key] = feats.get(key, 0.0) + 0.25
        for a, b in zip(ws, ws[1:], strict=False):
            key = f"b:{a} {b}"
            feats[key] = feats.get(key, 0.0) + 0.5
        return feats

    def __call__(self, description: str) -> torch.Tensor:
        """The unit vector of ``description``."""
        v = [0.0] * self.dim
        for feature, weight in self.features(description).items():
            slot, sign = self._slot(feature)
            v[slot] += sign * weight
        out = torch.tensor(v, dtype=torch.float32)
        return out / out.norm().clamp_min(1e-12)

    def encode(self, descriptions: list[str]) -> torch.Tensor:
        """``(n, dim)`` unit vectors of ``descriptions``."""
        return torch.stack([self(d) for d in descriptions]) if descriptions else torch.empty(0)

    def to_dict(self) -> dict:
        return {"name": "hashing-ngrams", "dim": self.dim}
