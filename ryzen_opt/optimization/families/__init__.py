"""Model families: one module per family of models ``optimize()`` has whole-step fast paths for.

A family module answers four questions about a model:

* ``why_not(model) -> str | None``: ``None`` if the family serves the model, else the reason
  (named in the report), e.g. a configuration the fast path does not implement;
* ``layout(model)``: its weights in the layout its fused steps read (views, no copies);
* which whole-step fast paths it offers (``FAST_PATHS``);
* its prefill/decode workloads for selection live in :mod:`ryzen_opt.optimization.sites`.

``find(model)`` returns the first family module whose ``claims(model)`` is true together with
its ``why_not`` reason, or ``(None, reason)`` when no family knows the model.
"""

from __future__ import annotations

from types import ModuleType

import torch.nn as nn

from ryzen_opt.optimization.families import gpt2, llama

HF_FAMILIES: tuple[ModuleType, ...] = (llama, gpt2)


def find(model: nn.Module) -> tuple[ModuleType | None, str | None]:
    """``(family, None)`` if a family serves ``model``, else ``(family or None, reason)``."""
    for fam in HF_FAMILIES:
        if fam.claims(model):
            return fam, fam.why_not(model)
    return None, f"{type(model).__name__} is not a model family with a whole-step fast path"
