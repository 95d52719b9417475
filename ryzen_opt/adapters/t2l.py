"""``TextToLoRA``: a hypernetwork that turns a task description into LoRA weights.

The description is embedded by :class:`~ryzen_opt.adapters.text.HashingTextEncoder`; an MLP
maps the embedding to a task code; for every targeted module the code plus a learned embedding
of its layer and of its module kind (``qkv``, ``proj``, ...) goes through a shared MLP and an
output head of that module kind, whose output is the module's ``A`` ``(rank, in)`` and ``B``
``(out, rank)``. One forward gives a whole adapter; no gradient step is taken at generation.

Two ways to train it (:mod:`ryzen_opt.adapters.instant`): *reconstruction* of a library of
trained task LoRAs (the loss compares the updates ``scaling * B @ A``, not the factors, which
are not unique), and *SFT*: the generated adapter runs inside the frozen base model and the
answer tokens' cross-entropy trains the hypernetwork.

Public API::

    t2l = TextToLoRA.load("checkpoints/instant/t2l_sft")
    adapter = t2l.generate("add two 3-digit numbers, digits reversed", seed=0)
    adapter.save("runs/my_adapter")          # PEFT format: AdapterRegistry.register(...)
    adapter.load_into(model, name="mine")    # or straight into a model

``generate`` is deterministic for a description and seed: with ``temperature=0`` (the default)
the seed changes nothing; with ``temperature > 0`` the task code gets seeded Gaussian noise of
that scale (nearby adapters, e.g. for best-of-n).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ryzen_opt.adapters.config import AdapterError, LoraConfig
from ryzen_opt.adapters.io import write_peft
from ryzen_opt.adapters.lora import add_lora, find_targets, lora_layers
from ryzen_opt.adapters.text import HashingTextEncoder, check_description
from ryzen_opt.models.config import short_repr

CONFIG_FILE = "t2l_config.json"
WEIGHTS_FILE = "t2l.safetensors"
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def target_layout(model: nn.Module, config: LoraConfig) -> list[dict[str, Any]]:
    """Every module ``config`` targets in ``model``: path, layer index, kind, in and out.

    The layer index is the first integer component of the path (``blocks.1.attn.qkv`` -> 1);
    the kind is the last component.
    """
    out = []
    for path, m in find_targets(model, config).items():
        base = getattr(m, "base_layer", m)
        w = base.weight
        fan_in_fan_out = type(base).__name__ == "Conv1D"
        d_in, d_out = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        hit = _LAYER.search(path)
        out.append(
            {
                "path": path,
                "layer": int(hit.group(1)) if hit else 0,
                "kind": path.rsplit(".", 1)[-1],
                "in": int(d_in),
                "out": int(d_out),
                "fan_in_fan_out": fan_in_fan_out,
            }
        )
    return out


@dataclass
class GeneratedAdapter:
    """A LoRA adapter made by :meth:`TextToLoRA.generate`.

    Attributes:
        description: the description it was made from (stripped).
        seed: the seed it was made with.
        config: its :class:`LoraConfig`.
        weights: ``{module path: (A (rank, in), B (out, rank))}``.
        seconds: wall time of the generation.
    """

    description: str
    seed: int
    config: LoraConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    seconds: float = 0.0
    fan_in_fan_out: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.weights.values())

    def save(self, folder: str | Path) -> Path:
        """Write the adapter into ``folder`` in PEFT's format (plus ``generated.json``: the
        description and seed). Returns the folder; ``AdapterRegistry.register`` takes it."""
        state = {}
        for path, (a, b) in self.weights.items():
            state[f"base_model.model.{path}.lora_A.weight"] = a.contiguous()
            state[f"base_model.model.{path}.lora_B.weight"] = b.contiguous()
        folder = write_peft(folder, self.config, state, self.fan_in_fan_out)
        info = {"description": self.description, "seed": self.seed, **self.meta}
        (folder / "generated.json").write_text(json.dumps(info, indent=2))
        return folder

    def load_into(self, model: nn.Module, name: str = "default") -> nn.Module:
        """Add the adapter to ``model`` as adapter ``name`` (not activated), in place."""
        add_lora(model, self.config, name, init=False)
        layers = lora_layers(model)
        missing = sorted(set(self.weights) - set(layers))
        if missing:
            raise AdapterError(f"model has no targeted module {missing[0]!r} for this adapter")
        with torch.no_grad():
            for path, (a, b) in self.weights.items():
                layers[path].lora_A[name].copy_(a)
                layers[path].lora_B[name].copy_(b)
        return model


class TextToLoRA(nn.Module):
    """Description -> LoRA adapter hypernetwork (see the module docstring).

    Args:
        layout: the targeted modules, from :func:`target_layout`.
        lora: rank, alpha and targets of the adapters it makes.
        encoder_dim: size of the description embedding.
        hidden: width of the task code and of the shared MLP.

    Build one for a model with :meth:`for_model`.
    """

    def __init__(
        self,
        layout: list[dict[str, Any]],
        lora: LoraConfig,
        encoder_dim: int = 512,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        if not layout:
            raise AdapterError("layout must name at least one targeted module")
        if not isinstance(lora, LoraConfig):
            raise AdapterError(f"lora must be a LoraConfig, got {type(lora).__name__}")
        for key, v in (("encoder_dim", encoder_dim), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise AdapterError(f"{key} must be an int >= 1, got {short_repr(v)}")
        self.layout = [dict(t) for t in layout]
        self.lora = lora
        self.encoder = HashingTextEncoder(encoder_dim)
        self.kinds = sorted({t["kind"] for t in layout})
        n_layers = 1 + max(t["layer"] for t in layout)
        r = lora.rank
        self.task_mlp = nn.Sequential(
            nn.Linear(encoder_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.layer_emb = nn.Embedding(n_layers, hidden)
        self.kind_emb = nn.Embedding(len(self.kinds), hidden)
        self.shared = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU())
        shapes = {t["kind"]: (t["in"], t["out"]) for t in layout}
        self.heads = nn.ModuleDict(
            {k: nn.Linear(hidden, r * (i + o)) for k, (i, o) in shapes.items()}
        )
        self._shapes = shapes
        with torch.no_grad():
            nn.init.normal_(self.layer_emb.weight, std=0.5)
            nn.init.normal_(self.kind_emb.weight, std=0.5)
            for k, head in self.heads.items():
                i, o = shapes[k]
                # A starts as PEFT's Kaiming-uniform draw (in the bias), B at zero: a fresh
                # hypernetwork makes adapters that change nothing, like a fresh LoRA.
                head.weight.mul_(0.01)
                bound = 1.0 / (i**0.5)
                head.bias.zero_()
                head.bias[: r * i].uniform_(-bound, bound)
        self._groups = {
            k: (
                [t["path"] for t in layout if t["kind"] == k],
                torch.tensor([t["layer"] for t in layout if t["kind"] == k]),
            )
            for k in self.kinds
        }
        self.eval()

    @classmethod
    def for_model(
        cls, model: nn.Module, lora: LoraConfig | None = None, **kwargs: Any
    ) -> TextToLoRA:
        """A fresh hypernetwork making adapters of shape ``lora`` for ``model``."""
        lora = LoraConfig() if lora is None else lora
        return cls(target_layout(model, lora), lora, **kwargs)

    # -- the hypernetwork --------------------------------------------------------------------
    def codes(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(n, hidden)`` task codes of ``(n, encoder_dim)`` description embeddings."""
        return self.task_mlp(embeddings)

    def adapters_from_codes(
        self, codes: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{path: (A (n, rank, in), B (n, out, rank))}`` for ``(n, hidden)`` task codes."""
        r = self.lora.rank
        out = {}
        for ki, k in enumerate(self.kinds):
            paths, layers = self._groups[k]
            i, o = self._shapes[k]
            z = codes[:, None, :] + self.layer_emb(layers)[None] + self.kind_emb.weight[ki]
            flat = self.heads[k](self.shared(z))  # (n, layers of kind k, r * (i + o))
            for j, p in enumerate(paths):
                a = flat[:, j, : r * i].reshape(-1, r, i)
                b = flat[:, j, r * i :].reshape(-1, o, r)
                out[p] = (a, b)
        return out

    def forward(self, embeddings: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.adapters_from_codes(self.codes(embeddings))

    def embed(self, descriptions: list[str]) -> torch.Tensor:
        """``(n, encoder_dim)`` embeddings (each description checked)."""
        return self.encoder.encode(list(descriptions))

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, description: str, seed: int = 0, temperature: float = 0.0
    ) -> GeneratedAdapter:
        """An adapter for the task ``description`` describes.

        Args:
            description: plain text, 1..1000 characters with at least one word.
            seed: seeds the noise of ``temperature`` (an int >= 0).
            temperature: scale of the seeded Gaussian noise added to the task code
                (0: none, the seed changes nothing).

        Returns:
            A :class:`GeneratedAdapter` (``.save(folder)`` writes it in PEFT format).

        Raises:
            AdapterError: a bad description, seed or temperature (the message names it).

        Example:
            >>> from ryzen_opt.adapters import LoraConfig, TextToLoRA
            >>> from ryzen_opt.models import ModelConfig, SimpleTransformerModel
            >>> m = SimpleTransformerModel(ModelConfig(num_layers=1))
            >>> t2l = TextToLoRA.for_model(m, LoraConfig(rank=4))
            >>> t2l.generate("add two numbers").num_parameters
            12288
        """
        t0 = time.perf_counter()
        text = check_description(description)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise AdapterError(f"seed must be an int >= 0, got {short_repr(seed)}")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not 0 <= temperature < float("inf")
        ):
            raise AdapterError(f"temperature must be a finite number >= 0, got {temperature!r}")
        code = self.task_mlp(self.encoder(text)[None])
        if temperature > 0:
            g = torch.Generator().manual_seed(seed)
            code = code + temperature * torch.randn(code.shape, generator=g)
        pairs = self.adapters_from_codes(code)
        weights = {p: (a[0].clone(), b[0].clone()) for p, (a, b) in pairs.items()}
        return GeneratedAdapter(
            description=text,
            seed=seed,
            config=self.lora,
            weights=weights,
            seconds=time.perf_counter() - t0,
            fan_in_fan_out=any(t["fan_in_fan_out"] for t in self.layout),
            meta={"generator": "TextToLoRA", "temperature": temperature},
        )

    # -- files -------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "lora": self.lora.to_dict(),
            "encoder": self.encoder.to_dict(),
            "hidden": self.layer_emb.embedding_dim,
        }

    def save(self, folder: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write the hypernetwork (config JSON + safetensors) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        cfg = {**self.config_dict(), "meta": meta or {}}
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TextToLoRA:
        """A hypernetwork written by :meth:`save`; raises :class:`AdapterError` naming the
        file if it is missing or does not fit its config."""
        folder = Path(folder)
        cfile, wfile = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for f in (cfile, wfile):
            if not f.is_file():
                raise AdapterError(f"folder {str(folder)!r} has no {f.name}")
        try:
            cfg = json.loads(cfile.read_text())
            lora = cfg["lora"]
            t2l = cls(
                cfg["layout"],
                LoraConfig(lora["rank"], lora["alpha"], tuple(lora["target_modules"])),
                encoder_dim=cfg["encoder"]["dim"],
                hidden=cfg["hidden"],
            )
        except (ValueError, KeyError, TypeError) as e:
            raise AdapterError(f"{cfile}: not a TextToLoRA config ({e})") from None
        try:
            t2l.load_state_dict(load_file(str(wfile)))
        except Exception as e:
            raise AdapterError(f"{wfile}: does not fit {cfile.name} ({e})") from None
        t2l.meta = cfg.get("meta", {})
        return t2l.eval()


def delta_loss(
    gen: dict[str, tuple[torch.Tensor, torch.Tensor]],
    target: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
    target_scaling: float,
) -> torch.Tensor:
    """Mean over modules and rows of ``||dW_gen - dW_target||^2 / ||dW_target||^2``, with
    ``dW = scaling * B @ A``, computed through ``rank x rank`` Gram matrices (never forms dW).

    ``gen`` holds batched ``(A (n, r, in), B (n, out, r))``; ``target`` the same with the
    library adapters' factors, row for row.
    """
    losses = []
    for p, (a, b) in gen.items():
        ta, tb = target[p]
        a, b = a * scaling, b
        ta = ta * target_scaling
        gg = (b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))  # elementwise: tr(BtB AAt)
        tt = (tb.transpose(1, 2) @ tb) * (ta @ ta.transpose(1, 2))
        gt = (b.transpose(1, 2) @ tb) * (a @ ta.transpose(1, 2))
        g2, t2, x = gg.sum((1, 2)), tt.sum((1, 2)), gt.sum((1, 2))
        losses.append((g2 - 2 * x + t2) / t2.clamp_min(1e-12))
    return torch.stack(losses).mean()


def lora_forward_hooks(
    model: nn.Module,
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks adding ``scaling * B_row @ A_row @ x_row`` to each module in ``weights``
    (batched ``(n, r, in)`` / ``(n, out, r)``, one adapter per batch row): how SFT runs
    generated adapters inside the frozen base model with gradients. Remove the handles after.
    """
    handles = []
    for path, (a, b) in weights.items():
        mod = model.get_submodule(path)

        def hook(_m, args, y, a=a, b=b):
            x = args[0]
            d = torch.bmm(
                torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a.transpose(1, 2)),
                b.transpose(1, 2),
            )
            return y + scaling * d.reshape(y.shape)

        handles.append(mod.register_forward_hook(hook))
    return handles
