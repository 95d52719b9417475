"""``LoraConfig``: one LoRA adapter's shape, validated, with PEFT's conventions.

A targeted layer ``y = W x + b`` gains ``scaling * B(A(dropout(x)))`` with ``A`` of shape
``(rank, in)`` (Kaiming-uniform, like ``nn.Linear`` and PEFT) and ``B`` of shape
``(out, rank)`` (zeros, so a new adapter changes nothing), and ``scaling = alpha / rank``.
``target_modules`` names modules the way PEFT's list form does: a module is targeted when its
dotted path equals a name or ends with ``"." + name``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from ryzen_opt.models.config import short_repr


class AdapterError(ValueError):
    """An adapter does not fit the model, or its files are missing or corrupt."""


@dataclass(frozen=True)
class LoraConfig:
    """The shape of one LoRA adapter.

    Args:
        rank: the inner dimension ``r`` of ``B @ A`` (PEFT's ``r``).
        alpha: PEFT's ``lora_alpha``; the update is scaled by ``alpha / rank``.
        target_modules: module names (PEFT's list form: a module whose dotted path equals a
            name or ends with ``"." + name``), e.g. ``("qkv", "proj")`` for
            ``SimpleTransformerModel`` or ``("q_proj", "v_proj")`` for Llama.
        dropout: dropout on the LoRA branch's input in training mode (PEFT's
            ``lora_dropout``).

    Example:
        >>> from ryzen_opt.adapters import LoraConfig
        >>> cfg = LoraConfig(rank=8, alpha=16, target_modules=("qkv", "fc1"))
        >>> cfg.scaling
        2.0
    """

    rank: int = 8
    # alpha = 2 * rank: the common choice in PEFT's examples, a scaling of 2.
    alpha: float = 16.0
    # Every Linear of SimpleTransformerModel's blocks; the tied output head is left alone
    # (a LoRA on it would also have to follow the token embedding it shares).
    target_modules: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    dropout: float = 0.0

    def __post_init__(self) -> None:
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise AdapterError(f"rank must be an int >= 1, got {short_repr(r)}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a) or a <= 0:
            raise AdapterError(f"alpha must be a finite number > 0, got {short_repr(a)}")
        t = self.target_modules
        if isinstance(t, str):
            t = (t,)  # one name, as PEFT's list form; a bare str is not a regex here
        try:
            names = tuple(t)
        except TypeError:
            raise AdapterError(
                f"target_modules must be a sequence of module names, got {short_repr(t)}"
            ) from None
        if not names or any(not isinstance(n, str) or not n or n != n.strip() for n in names):
            raise AdapterError(
                f"target_modules must be non-empty module names, got {short_repr(t)}"
            )
        object.__setattr__(self, "target_modules", tuple(sorted(set(names))))
        object.__setattr__(self, "rank", int(r))
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0 <= d < 1:
            raise AdapterError(f"dropout must be a number in [0, 1), got {short_repr(d)}")

    @property
    def scaling(self) -> float:
        """``alpha / rank``, PEFT's scaling of the update (without rsLoRA)."""
        return self.alpha / self.rank

    def targets(self, module_path: str) -> bool:
        """True iff the module at ``module_path`` is targeted (PEFT's list-form rule)."""
        return any(module_path == n or module_path.endswith("." + n) for n in self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "dropout": self.dropout,
            "scaling": self.scaling,
        }
