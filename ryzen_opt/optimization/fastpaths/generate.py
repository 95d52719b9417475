"""``generate`` for an optimized Hugging Face decoder: HF's API, the fast decode loop.

:class:`FastGenerate` is installed as the model's ``generate`` (an instance attribute: the
class, ``forward``, ``state_dict`` and ``save_pretrained`` stay the model's own). A call:

1. resolves the generation settings as ``generate`` does (the model's ``generation_config``
   updated by the keyword arguments); settings the fast loop does not implement (beam search,
   repetition penalties, streamers, returned scores, ...) or a batch size no path was chosen
   for go to the original ``generate`` unchanged, and the reason is kept in ``last_route``;
2. prefills with the model's own ``forward`` (attention mask and position ids as
   ``generate`` builds them: left padding supported), then hands the cache to the path
   chosen for the batch size;
3. greedy: the path's greedy loop; sampling: one step per token, HF's own logits warpers
   (temperature, top-k, top-p, in HF's order) and ``torch.multinomial`` on the same
   probabilities shape, so the random stream is consumed as the original consumes it;
4. rows that emitted an eos token continue with ``pad_token_id``; the loop stops when every
   row has finished; the result is ``cat([input_ids, new_tokens], 1)`` as ``generate``
   returns it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ryzen_opt.optimization.fastpaths import decoder
from ryzen_opt.optimization.fastpaths.decoder_layout import DecoderLayout
from ryzen_opt.optimization.fastpaths.layout import ModuleTree
from ryzen_opt.optimization.fastpaths.lora import is_lora, lora_needs_delta

# Generation settings the fast loop implements; any other setting that differs from
# transformers' defaults sends the call to the original generate.
HANDLED = {
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "min_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "use_cache",
    "transformers_version",
    "_from_model_config",
    "cache_implementation",
}


# Values of settings that leave greedy decoding and sampling as they are (transformers 4.x
# and 5.x differ in which of them a config stores and which default to None).
NEUTRAL = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "diversity_penalty": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "early_stopping": False,
}


def _neutral(key: str, value: Any, defaults: Any) -> bool:
    """Whether a stored setting changes nothing the fast loop does."""
    if value is None or value is False or value == {} or value == []:
        return True
    return value == getattr(defaults, key, None) or (key in NEUTRAL and NEUTRAL[key] == value)


def _eos_list(eos: Any) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(x) for x in eos.flatten().tolist()]
    return [int(eos)] if isinstance(eos, int) else [int(x) for x in eos]


class FastGenerate:
    """The installed ``generate``. ``routes``: ``(lo, hi, path name)`` per batch range."""

    def __init__(self, model: nn.Module, routes: list[tuple[int, int, str]]) -> None:
        self.model, self.routes = model, list(routes)
        self._layout: DecoderLayout | None = None
        self._keep_kw: dict[str, int] | None = None
        self.steppers: dict[int, decoder.Stepper] = {}
        self.shared: dict = {}  # what every batch size's stepper reuses (decoders, int8)
        self.last_route = ""
        self.tree = ModuleTree(model)  # the modules the layout was read from
        self.loras = [m for m in model.modules() if is_lora(m)]
        self.__doc__ = type(model).generate.__doc__

    @property
    def original(self) -> Callable[..., Any]:
        """The model class's own ``generate``, bound to the model."""
        return type(self.model).generate.__get__(self.model)

    @property
    def layout(self) -> DecoderLayout:
        if self._layout is None:
            from ryzen_opt.optimization import families

            fam, reason = families.find(self.model)
            if reason is not None:
                raise ValueError(f"model: {reason}")
            self._layout = fam.layout(self.model)
        return self._layout

    def __deepcopy__(self, memo):
        # Steppers hold this model's buffers and graphs; the copy builds its own lazily (the
        # copied model may still be under construction here: the tree is copied through the
        # same memo rather than read from it).
        new = FastGenerate.__new__(FastGenerate)
        new.model, new.routes = copy.deepcopy(self.model, memo), list(self.routes)
        new._layout, new._keep_kw, new.steppers, new.shared = None, None, {}, {}
        new.last_route = ""
        new.tree = copy.deepcopy(self.tree, memo)
        new.loras = copy.deepcopy(self.loras, memo)
        new.__doc__ = self.__doc__
        return new

    def path_for(self, batch: int) -> str | None:
        for lo, hi, name in self.routes:
            if lo <= batch <= hi:
                return name
        return None

    def stepper(self, batch: int, needed: int) -> decoder.Stepper:
        name = self.path_for(batch)
        st = self.steppers.get(batch)
        if st is None or st.name != name or st.max_len < needed or st.stale():
            self.steppers.pop(batch, None)  # free the old buffers before the new ones
            length = decoder.cache_len(needed, self.layout.max_positions)
            st = decoder.PATHS[name](self.layout, batch, length, self.shared)
            self.steppers[batch] = st
        return st

    # ------------------------------------------------------------------ settings

    def _settings(self, generation_config, kwargs) -> tuple[Any, str | None]:
        """The resolved GenerationConfig and ``None``, or ``(None, reason to fall back)``."""
        from transformers import GenerationConfig

        defaults = GenerationConfig()
        library = getattr(GenerationConfig, "_get_default_generation_params", None)
        if library is None:  # transformers 4: the config given, or the model's, holds defaults
            given = self.model.generation_config if generation_config is None else generation_config
            cfg = copy.deepcopy(given)
        else:
            # transformers 5 leaves unset settings None and fills them in generate(): first
            # from the model's config, then the library's defaults (top_k=50, max_length=20,
            # ...); resolve them the same way, or sampling would drop HF's default top-k.
            given = generation_config if generation_config is not None else GenerationConfig()
            cfg = copy.deepcopy(given)
            cfg.update(
                **self.model.generation_config.to_dict(),
                defaults_only=True,
                allow_custom_entries=True,
            )
            cfg.update(**library(), defaults_only=True)
            defaults.update(**library(), defaults_only=True)
        unused = cfg.update(**kwargs)
        if unused:
            return None, f"model keyword arguments {sorted(unused)}"
        diff = cfg.to_diff_dict() if hasattr(cfg, "to_diff_dict") else {}
        other = sorted(k for k in diff if k not in HANDLED and not _neutral(k, diff[k], defaults))
        if other:
            return None, f"generation settings {other}"
        if cfg.max_new_tokens is None and cfg.max_length is None:
            return None, "no max_new_tokens / max_length"
        return cfg, None

    # ------------------------------------------------------------------ call

    def __call__(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        fallback = dict(kwargs, generation_config=generation_config)
        if attention_mask is not None:
            fallback["attention_mask"] = attention_mask
        reason = self._why_fallback(input_ids, attention_mask, kwargs)
        cfg = None
        if reason is None:
            cfg, reason = self._settings(generation_config, kwargs)
        if reason is None:
            return self._generate(input_ids, attention_mask, cfg)
        self.last_route = f"original generate: {reason}"
        if input_ids is not None:
            fallback["input_ids"] = input_ids
        return self.original(**fallback)

    def _why_fallback(self, input_ids, attention_mask, kwargs) -> str | None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            return "input_ids is not a (batch, seq) tensor"
        if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.shape[1] == 0:
            return "input_ids is not a non-empty integer tensor"
        if not self.tree.same():
            return (
                "the model's modules changed after optimize() (e.g. LoRA layers added); "
                "call optimize() again"
            )
        if any(map(lora_needs_delta, self.loras)):
            return "an unmerged LoRA adapter is active (the decode loop adds no LoRA updates)"
        if input_ids.device != self.layout.device:
            return f"input_ids is on {input_ids.device}, the model on {self.layout.device}"
        if self.model.training and torch.is_grad_enabled():
            return "the model is in training mode"
        if self.path_for(input_ids.shape[0]) is None:
            return f"no fast path was chosen for batch {input_ids.shape[0]}"
        for k in (
            "streamer",
            "logits_processor",
            "stopping_criteria",
            "assistant_model",
            "prefix_allowed_tokens_fn",
            "synced_gpus",
            "negative_prompt_ids",
        ):
            if kwargs.get(k) is not None:
                return f"{k} is given"
        return None

    def _mask(self, ids: torch.Tensor, mask, pad: int | None, eos: list[int]) -> torch.Tensor:
        """The attention mask ``generate`` would use (inferred from ``pad_token_id``)."""
        if mask is not None:
            return mask.to(ids.device).long()
        if pad is not None and pad not in eos and bool((ids == pad).any()):
            return (ids != pad).long()
        return torch.ones_like(ids)

    @torch.no_grad()
    def _generate(self, input_ids: torch.Tensor, attention_mask, cfg) -> torch.Tensor:
        ids = input_ids.long()
        b, p = ids.shape
        eos = _eos_list(cfg.eos_token_id)
        pad = cfg.pad_token_id
        if pad is None and eos:
            pad = eos[0]
        mask = self._mask(ids, attention_mask, pad, eos)
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask must have input_ids' shape {tuple(ids.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        # Left padding only: a 0 after a 1 in a row is right padding, served by the original.
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            self.last_route = "original generate: the attention mask is not left padding"
            return self.original(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg
            )
        max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else cfg.max_length - p
        if max_new <= 0:
            return ids
        if p + max_new > self.layout.max_positions:
            self.last_route = "original generate: the generation exceeds the model's context"
            return self.original(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg
            )
        st = self.stepper(b, p + max_new)
        self.last_route = st.name
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **self._keep(),
        )
        start = (p - mask.sum(-1)).to(ids.device)
        st.load(out.past_key_values, p, start)
        logits = out.logits[:, -1]
        del out
        dev = ids.device
        # An eos id outside the vocabulary can never be produced (tiny test configs keep
        # GPT-2's 50256): it stops nothing, and it must not index the logits.
        eos = [e for e in eos if 0 <= e < self.layout.vocab]
        eos_t = torch.tensor(eos, dtype=torch.int64, device=dev) if eos else None
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        warpers = self._warpers(cfg) if cfg.do_sample else None
        # min_new_tokens / min_length: eos cannot be chosen before that many new tokens.
        min_new = max(cfg.min_new_tokens or 0, (cfg.min_length or 0) - p) if eos else 0
        seq = ids
        first = self._choose(logits, seq, warpers, eos_t if min_new > 0 else None)
        new = [first[:, None]]
        if eos_t is not None:
            finished = torch.isin(first, eos_t)
        if max_new > 1 and not (eos_t is not None and bool(finished.all())):
            if warpers is None:
                pad_id = pad if pad is not None else 0
                tokens, _ = st.greedy(first, p, max_new - 1, eos_t, pad_id, finished, min_new - 1)
                new.append(tokens)
            else:
                nxt = first
                for j in range(max_new - 1):
                    seq = torch.cat([ids] + new, 1)
                    blocked = eos_t if j + 1 < min_new else None
                    nxt = self._choose(st.step(nxt, p + j), seq, warpers, blocked)
                    if pad is not None:
                        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                    new.append(nxt[:, None])
                    if eos_t is not None:
                        finished = finished | torch.isin(nxt, eos_t)
                        if bool(finished.all()):
                            break
        return torch.cat([ids] + new, 1)

    def _keep(self) -> dict[str, int]:
        """``logits_to_keep=1`` where the model's forward takes it (looked up once)."""
        if self._keep_kw is None:
            params = inspect.signature(self.model.forward).parameters
            self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        return self._keep_kw

    @staticmethod
    def _warpers(cfg):
        """HF's sampling warpers in ``generate``'s order, from the resolved settings."""
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        out = LogitsProcessorList()
        if cfg.temperature is not None and cfg.temperature != 1.0:
            out.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k is not None and cfg.top_k != 0:
            out.append(TopKLogitsWarper(top_k=cfg.top_k, min_tokens_to_keep=1))
        if cfg.top_p is not None and cfg.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=cfg.top_p, min_tokens_to_keep=1))
        return out

    @staticmethod
    def _choose(logits: torch.Tensor, seq: torch.Tensor, warpers, blocked=None) -> torch.Tensor:
        scores = logits.to(dtype=torch.float32, copy=True)
        if blocked is not None:
            scores.index_fill_(-1, blocked, float("-inf"))
        if warpers is None:
            return scores.argmax(-1)
        scores = warpers(seq, scores)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)


def install(
    model: nn.Module, layout: DecoderLayout, routes, shared: dict | None = None
) -> Callable[[], None]:
    """Route ``model.generate`` through :class:`FastGenerate`; returns the undo. ``shared``:
    what the selection already built for the paths (reused, not rebuilt)."""
    fast = FastGenerate(model, routes)
    fast._layout = layout
    fast.shared = {} if shared is None else shared
    model.generate = fast

    def undo() -> None:
        if model.__dict__.get("generate") is fast:
            del model.generate

    return undo


def adopt_modules(model: nn.Module) -> None:
    """Let the installed :class:`FastGenerate` take ``model``'s modules as they are now.

    ``optimize()`` installs the decode path first and its verified per-op swaps after (a
    wrapper around the same module, the same parameters); without this the path would see
    them as "modules changed after optimize()" and run the original ``generate`` on every
    call. Only for ``optimize()``'s own swaps: a module a user swaps in later still sends
    ``generate`` to the original. Nothing to do when no :class:`FastGenerate` is installed."""
    fast = model.__dict__.get("generate")
    if isinstance(fast, FastGenerate):
        fast.tree = ModuleTree(model)
