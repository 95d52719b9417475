"""``AdapterRegistry``: many named adapters over one base model, a bounded number resident.

Adapters are registered by name and folder and loaded on first use; at most
``max_resident`` stay in the model, the least recently used one is dropped when another
must come in (it reloads from its folder when asked for again). Serving is unmerged
(switching changes names only: no weight is copied or allocated) or merged (the adapter is
folded into the base weights: the base model's cost per token; a switch restores the exact
base weights from a copy, then folds the next adapter in). Either way the base ``Parameter``
objects and their storage stay the same.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ryzen_opt.adapters.config import AdapterError
from ryzen_opt.adapters.io import load_adapter
from ryzen_opt.adapters.lora import (
    _check_name,
    activate_layers,
    delete_adapter,
    lora_layers,
    merge_layers,
    mixed_batch,
)
from ryzen_opt.models.config import short_repr


class AdapterRegistry:
    """Named LoRA adapters served over one base model, loaded lazily, LRU-bounded.

    Args:
        model: the base model (``SimpleTransformerModel`` or an HF causal LM); adapters are
            added to it in place.
        max_resident: how many adapters may be loaded at once.
        merged: serve merged (fold the active adapter into the base weights) instead of
            unmerged.

    Example:
        >>> import tempfile, torch
        >>> from ryzen_opt.adapters import AdapterRegistry, LoraConfig, add_lora, save_adapter
        >>> from ryzen_opt.models import ModelConfig, SimpleTransformerModel
        >>> base = SimpleTransformerModel(ModelConfig(num_layers=1)).eval()
        >>> d = tempfile.mkdtemp()
        >>> _ = save_adapter(add_lora(SimpleTransformerModel(ModelConfig(num_layers=1)),
        ...                           LoraConfig(rank=4)), d)
        >>> reg = AdapterRegistry(base, max_resident=2)
        >>> reg.register("mine", d)
        >>> out = reg.generate(torch.tensor([[1, 2, 3]]), adapter="mine", max_new_tokens=4)
        >>> out.shape
        torch.Size([1, 7])
    """

    def __init__(self, model: nn.Module, max_resident: int = 4, merged: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise AdapterError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(max_resident, bool) or not isinstance(max_resident, int) or max_resident < 1:
            raise AdapterError(f"max_resident must be an int >= 1, got {short_repr(max_resident)}")
        if not isinstance(merged, bool):
            raise AdapterError(f"merged must be a bool, got {short_repr(merged)}")
        self.model = model
        self.max_resident = max_resident
        self.merged = merged
        self._folders: dict[str, Path] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._layers = list(lora_layers(model).values())
        self._active: str | None = None
        self._streams = 0  # open generate_stream calls: a switch meanwhile would mix adapters

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def active(self) -> str | None:
        """The adapter the model runs with now (``None``: the base model)."""
        return self._active

    @property
    def resident(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._resident)

    @property
    def registered(self) -> list[str]:
        return list(self._folders)

    def register(self, name: str, folder: str | Path) -> None:
        """Make adapter ``name`` available from ``folder`` (PEFT format); loads nothing yet."""
        _check_name(name)
        if name in self._folders:
            raise AdapterError(f"name {name!r} is already registered ({self._folders[name]})")
        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterError(f"folder {str(folder)!r} for adapter {name!r} does not exist")
        self._folders[name] = folder

    def load(self, name: str) -> None:
        """Make ``name`` resident (loading it if needed) and most recently used.

        The least recently used adapters beyond ``max_resident`` are dropped after a
        successful load; a failed load changes nothing.
        """
        if name not in self._folders:
            raise AdapterError(f"adapter {name!r} is not registered (known: {self.registered})")
        if name in self._resident:
            self._resident.move_to_end(name)
            return
        self._check_idle()
        load_adapter(self.model, self._folders[name], name)
        self._resident[name] = None
        self._layers = list(lora_layers(self.model).values())
        while len(self._resident) > self.max_resident:
            self._evict(next(iter(self._resident)))

    def _evict(self, name: str) -> None:
        if name == self._active:
            self.deactivate()
        delete_adapter(self.model, name)
        del self._resident[name]

    def _check_idle(self) -> None:
        if self._streams:
            raise AdapterError("cannot switch adapters while a generate_stream is open")

    # -- switching ---------------------------------------------------------------------------
    def activate(self, name: str) -> None:
        """Serve adapter ``name`` from now on (loading it first if it is not resident)."""
        self.load(name)
        if name == self._active:
            return
        self._check_idle()
        if self.merged:
            merge_layers(self._layers, name)
        else:
            activate_layers(self._layers, name)
        self._active = name

    def deactivate(self) -> None:
        """Serve the base model (restoring its exact weights if an adapter was merged)."""
        if self._active is None:
            return
        self._check_idle()
        activate_layers(self._layers, None)
        self._active = None

    @contextlib.contextmanager
    def _serving(self, adapter: str | Sequence[str | None] | None) -> Iterator[None]:
        if adapter is None or isinstance(adapter, str):
            self.deactivate() if adapter is None else self.activate(adapter)
            yield
            return
        names = [n for n in dict.fromkeys(adapter) if n is not None]
        if self.merged:
            raise AdapterError("adapter: a list (one adapter per row) needs merged=False")
        if len(names) > self.max_resident:
            raise AdapterError(
                f"adapter: {len(names)} distinct adapters in one batch, max_resident is "
                f"{self.max_resident}"
            )
        for n in names:
            self.load(n)
        self.deactivate()
        with mixed_batch(self.model, list(adapter)):
            yield

    # -- generation --------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: torch.Tensor,
        adapter: str | Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The model's own ``generate(prompt_ids, **kwargs)`` with ``adapter`` serving.

        Args:
            prompt_ids: ``(batch, seq)`` prompt ids.
            adapter: an adapter name, ``None`` for the base model, or one name (or ``None``)
                per batch row for a mixed batch (unmerged serving only).
            **kwargs: passed to the model's ``generate`` (``max_new_tokens``, ...).

        Returns:
            What the model's ``generate`` returns (prompt and new ids). A named adapter stays
            active afterwards (the next request for it switches nothing).

        Raises:
            AdapterError: the model has no ``generate``, or ``adapter`` is not registered.
        """
        if not callable(getattr(self.model, "generate", None)):
            raise AdapterError(f"model: a {type(self.model).__name__} has no generate method")
        with self._serving(adapter):
            return self.model.generate(prompt_ids, **kwargs)

    def generate_stream(
        self,
        prompt_ids: torch.Tensor,
        adapter: str | Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> Iterator[torch.Tensor]:
        """Yield one ``(batch,)`` tensor of new ids per step, with ``adapter`` serving.

        Uses the model's ``generate_stream`` where it has one (``SimpleTransformerModel``),
        else its ``generate`` with a streamer (Hugging Face models) on a worker thread. The
        adapter cannot be switched until the stream is exhausted or closed.
        """
        with self._serving(adapter):
            self._streams += 1
            try:
                if hasattr(self.model, "generate_stream"):
                    yield from self.model.generate_stream(prompt_ids, **kwargs)
                else:
                    yield from _hf_stream(self.model, prompt_ids, kwargs)
            finally:
                self._streams -= 1


def _hf_stream(model: nn.Module, prompt_ids: torch.Tensor, kwargs: dict) -> Iterator[torch.Tensor]:
    from transformers.generation.streamers import BaseStreamer

    items: queue.Queue = queue.Queue()
    done = object()

    class _Streamer(BaseStreamer):
        prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate() puts the prompt first
                self.prompt_seen = True
                return
            items.put(value.reshape(-1))

        def end(self) -> None:
            items.put(done)

    def run() -> None:
        try:
            model.generate(prompt_ids, streamer=_Streamer(), **kwargs)
        except BaseException as e:  # re-raised in the consumer
            items.put(e)
            items.put(done)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        worker.join()  # the adapter must not change under a running generate
