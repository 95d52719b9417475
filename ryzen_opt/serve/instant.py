"""The committed instant adapters behind the HTTP API: Text-to-LoRA for
``POST /adapters/generate`` and SVF experts for ``adapter="auto"``.

Both builders take ``(registry, workdir)``, as ``ryzen-opt serve --adapter-factory`` and
``--experts`` call them (``ryzen-opt serve --instant`` names both)::

    ryzen-opt serve --adapter-factory ryzen_opt.serve.instant:text_to_lora \\
                    --experts ryzen_opt.serve.instant:svf_experts

* :func:`text_to_lora`: the hypernetwork of ``checkpoints/instant/t2l_recon`` (trained by
  reconstructing the task-LoRA library: the better of the two committed ones, see
  ``bench/results/cpu/instant_adapters.md``) makes an adapter from a description in one
  forward pass and saves it in PEFT format under ``workdir``.
* :func:`svf_experts`: the experts of ``checkpoints/instant/svf``; the first pass of the
  served model (base weights) picks the expert, whose weights serve the request and are
  replaced by the exact base weights afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
BASE_FOLDER = ROOT / "checkpoints" / "instant" / "base"  # the base they were trained over
T2L_FOLDER = ROOT / "checkpoints" / "instant" / "t2l_recon"
SVF_FOLDER = ROOT / "checkpoints" / "instant" / "svf"


def text_to_lora(
    registry, workdir: Path, folder: str | Path = T2L_FOLDER
) -> Callable[[str, int], Path]:
    """An adapter factory ``(description, seed) -> folder`` from a saved
    :class:`~ryzen_opt.adapters.TextToLoRA`.

    A bad description raises :class:`~ryzen_opt.adapters.AdapterError` (a ``ValueError``:
    the server answers 422). The same description and seed give the same adapter (the seed
    matters only to a sampling hypernetwork; this one decodes at temperature 0).
    """
    from ryzen_opt.adapters import TextToLoRA

    t2l = TextToLoRA.load(folder)
    out = Path(workdir)

    def factory(description: str, seed: int) -> Path:
        adapter = t2l.generate(description, seed=seed)
        key = hashlib.sha256(f"{seed}\0{description}".encode()).hexdigest()[:16]
        return adapter.save(out / f"t2l-{key}")

    return factory


class SVFWeightExperts:
    """:class:`~ryzen_opt.adapters.SVFExperts` as the server's weight experts (see
    :class:`ryzen_opt.serve.config.WeightExperts`) over ``model``, the registry's."""

    def __init__(self, experts, model: torch.nn.Module, tokenizer) -> None:
        self.experts, self.model, self.tokenizer = experts, model, tokenizer

    def identify(self, prompt: str) -> str:
        ids = torch.tensor([self.tokenizer.encode(prompt)])
        with torch.no_grad():
            return self.experts.identify(self.model, ids)[0]

    @contextlib.contextmanager
    def applied(self, name: str) -> Iterator[None]:
        # force: the registry may have changed the weights since this object last wrote them
        self.experts.apply(self.model, name, force=True)
        try:
            yield
        finally:
            self.experts.restore(self.model)


def svf_experts(registry, workdir: Path, folder: str | Path = SVF_FOLDER) -> SVFWeightExperts:
    """The server's weight experts from a saved :class:`~ryzen_opt.adapters.SVFExperts`."""
    from ryzen_opt.adapters import SVFExperts
    from ryzen_opt.models.tasks import CharTokenizer

    model = registry.model
    return SVFWeightExperts(SVFExperts.load(folder, model), model, CharTokenizer())
