"""``SVFExperts``: Transformer²-style singular-value expert vectors with two-pass inference.

Each targeted weight ``W = U diag(s) Vh`` is decomposed once (float64 SVD, kept in float32);
an expert is one vector ``z`` per weight, and its weight is ``W' = U diag(s * z) Vh``. It is
applied as ``W' = W + U diag(s * (z - 1)) Vh``, so all-ones ``z`` gives back ``W`` exactly. The
z-vectors are trained supervised here (answer-token cross-entropy,
:mod:`ryzen_opt.adapters.instant`); the paper trained them with RL.

Tiled SVF (``block=b``, not in the paper): each weight is cut into ``b x b`` tiles (``b``
capped at the weight's sides, which it must divide) and every tile gets its own SVD and its own
singular-value scales, so an expert has ``m * n / b`` scales per ``m x n`` weight instead of
``min(m, n)``. It is still only a rescaling of fixed singular directions (of the tiles, not of
the whole matrix), written into the weights in place like the plain form. ``block=None`` (the
default) is the paper's form. Why: on ``checkpoints/instant/base`` (a 2-layer, 256-wide model
that has to learn digit arithmetic, not just elicit it) plain SVF has 2048 scales per expert and
stalls: trained on ``sub2_pad`` alone for 800 steps of 64 it reached a training loss of 0.55 and
35% test accuracy (LoRA 100%), on ``sub3`` 1500 steps gave 0.60 and 9% (LoRA: 0.055, 93%), the
same as the joint run of all ten tasks. With ``block=128`` (8192 scales, 0.083 of a rank-16
LoRA's 98304 parameters) the same 800 steps took ``sub2_pad`` to 0.14 and 91% (256 test
problems each). The committed experts (1500 steps a task, 512 test problems, oracle skill):
7 of the 10 seen tasks at >= 90% of their LoRA's accuracy (plain SVF: 4); ``add3_pad`` 18%,
``sub3`` 30%, ``sub3_pad`` 14% still fall short (LoRA 99.8%, 93%, 95%).

Two-pass inference: :meth:`SVFExperts.identify` runs the prompt through the base model (the
first pass) and classifies the final hidden state of its last token and the mean over its
tokens with a linear classifier trained on the seen tasks' prompts; :meth:`SVFExperts.apply`
then writes the expert's weights (or an alpha-mixture ``z = sum_k alpha_k z_k``) into the
model's own weight tensors, in place. The second pass is the model's ordinary ``generate``,
so every fast path (``ryzen_opt.optimize``'s fused Numba decode reads the same storage) serves
it with no change. :meth:`SVFExperts.restore` writes the exact base weights back.

Public API::

    svf = SVFExperts.load("checkpoints/instant/svf", model)  # or SVFExperts(model, block=128)
    name = svf.identify(prompt_ids)          # one task name per row
    svf.apply(model, name)                   # or {"add2": 0.7, "sub2": 0.3}, or None (base)
    out = model.generate(prompt_ids, 8)      # the second pass, any fast path
    svf.restore(model)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ryzen_opt.adapters.config import AdapterError
from ryzen_opt.adapters.lora import LoraLinear
from ryzen_opt.models.config import short_repr

CONFIG_FILE = "svf_config.json"
WEIGHTS_FILE = "svf.safetensors"
DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")
_APPLIED = "_svf_applied"  # model attribute: (experts id, task, weight pointers) last written


def _weight(model: nn.Module, path: str) -> torch.Tensor:
    m = model.get_submodule(path)
    if isinstance(m, LoraLinear):
        m = m.base_layer
    if not isinstance(m, nn.Linear):
        raise AdapterError(f"model: {path} is a {type(m).__name__}, not an nn.Linear")
    return m.weight


def find_linear_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Paths of the ``nn.Linear`` (or LoRA-wrapped) modules whose name ends with a target."""
    out = []
    for path, m in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        if isinstance(m, (nn.Linear, LoraLinear)) and name in targets and ".base_layer" not in path:
            out.append(path)
    if not out:
        raise AdapterError(f"targets {targets} match no nn.Linear of the model")
    return out


class _Stop(Exception):
    """Ends the first pass's forward once the features are captured."""


class SVFExperts:
    """SVD-cached target weights of one base model, its expert z-vectors and skill classifier.

    Args:
        model: the base model (its current weights are the base weights).
        targets: names of the ``nn.Linear`` modules to adapt.
        feature_module: the module whose output gives the first pass's features for
            :meth:`identify` (the forward stops there): ``"ln_f"`` (the final hidden state)
            or, cheaper, an earlier layer's input norm such as ``"blocks.1.ln1"`` (the
            hidden state after the first layer) for ``SimpleTransformerModel``.
        block: ``None`` for the paper's SVF (one SVD per weight), or the tile side of tiled
            SVF (module docstring): one SVD and one set of scales per ``block x block`` tile.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: tuple[str, ...] = DEFAULT_TARGETS,
        feature_module: str = "ln_f",
        block: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise AdapterError(f"model must be an nn.Module, got {type(model).__name__}")
        if block is not None and (isinstance(block, bool) or not isinstance(block, int)
                                  or block < 1):  # fmt: skip
            raise AdapterError(f"block must be None or an int >= 1, got {short_repr(block)}")
        self.targets = tuple(targets)
        self.block = block
        self.paths = find_linear_targets(model, self.targets)
        self.set_feature_module(model, feature_module, keep_classifier=True)
        self.base: dict[str, torch.Tensor] = {}
        # plain: (U (m, k), s (k,), Vh (k, n)); tiled: (U (t, b, k), s (t, k), Vh (t, k, b))
        # over the t = rows x cols tiles, row-major, and self.grid[p] = (rows, cols).
        self.svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.grid: dict[str, tuple[int, int]] = {}
        for p in self.paths:
            w = _weight(model, p).detach()
            self.base[p] = w.clone()
            if block is None:
                u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
                self.svd[p] = (u.float(), s.float(), vh.float())
                continue
            (m, n), rb, cb = w.shape, min(block, w.shape[0]), min(block, w.shape[1])
            if m % rb or n % cb:
                raise AdapterError(f"block: {block} does not divide {p}'s shape {(m, n)}")
            nr, nc = m // rb, n // cb
            tiles = w.double().reshape(nr, rb, nc, cb).transpose(1, 2).reshape(nr * nc, rb, cb)
            u, s, vh = torch.linalg.svd(tiles, full_matrices=False)
            self.svd[p] = (u.float(), s.float(), vh.float())
            self.grid[p] = (nr, nc)
        self.experts: dict[str, dict[str, torch.Tensor]] = {}
        self.classifier: dict[str, torch.Tensor] | None = None  # weight, bias, mean, std
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        # SHA-256 (first 16 hex digits) of the target weights the SVD was taken of: saved with
        # the experts, checked on load (a z-vector scales its own base's singular directions).
        h = hashlib.sha256()
        for p in self.paths:
            h.update(p.encode())
            h.update(self.base[p].float().contiguous().numpy().tobytes())
        self.base_fingerprint = h.hexdigest()[:16]

    # -- experts -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The experts' task names."""
        return list(self.experts)

    def sizes(self) -> dict[str, int]:
        """Length of each target's z-vector (its number of singular values)."""
        return {p: int(s.numel()) for p, (_, s, _) in self.svd.items()}

    @property
    def num_parameters(self) -> int:
        """Trainable parameters of one expert."""
        return sum(self.sizes().values())

    def ones(self) -> dict[str, torch.Tensor]:
        """All-ones z-vectors (the base model)."""
        return {p: torch.ones(n) for p, n in self.sizes().items()}

    def add_expert(self, name: str, z: Mapping[str, torch.Tensor]) -> None:
        """Add (or replace) expert ``name`` with z-vectors ``{path: (k,)}``."""
        if not isinstance(name, str) or not name:
            raise AdapterError(f"name must be a non-empty str, got {short_repr(name)}")
        sizes = self.sizes()
        if set(z) != set(sizes):
            raise AdapterError(f"z must have one vector per target {sorted(sizes)}")
        for p, v in z.items():
            if v.shape != (sizes[p],):
                raise AdapterError(f"z[{p!r}] must have shape ({sizes[p]},), got {tuple(v.shape)}")
        self.experts[name] = {p: v.detach().float().clone() for p, v in z.items()}
        self._cache.pop(name, None)

    def _mixture(self, task: str | Mapping[str, float]) -> dict[str, torch.Tensor]:
        if isinstance(task, str):
            if task not in self.experts:
                raise AdapterError(f"task must be an expert {self.names}, got {task!r}")
            return self.experts[task]
        if not isinstance(task, Mapping) or not task:
            raise AdapterError(
                f"task must be an expert name or a non-empty {{name: alpha}} mixture, got "
                f"{short_repr(task)}"
            )
        z = {p: torch.zeros(n) for p, n in self.sizes().items()}
        for name, alpha in task.items():
            if name not in self.experts:
                raise AdapterError(f"task: {name!r} is not an expert {self.names}")
            for p in z:
                z[p] += float(alpha) * self.experts[name][p]
        return z

    def delta(self, path: str, z: torch.Tensor) -> torch.Tensor:
        """``W' - W`` of target ``path`` for its z-vector ``z`` (differentiable in ``z``)."""
        u, s, vh = self.svd[path]
        if path not in self.grid:
            return (u * (s * (z - 1.0))) @ vh
        (nr, nc), (_, rb, _), cb = self.grid[path], u.shape, vh.shape[-1]
        d = (u * (s * (z.reshape(s.shape) - 1.0))[:, None, :]) @ vh  # (tiles, rb, cb)
        return d.reshape(nr, nc, rb, cb).transpose(1, 2).reshape(nr * rb, nc * cb)

    def weights(self, task: str | Mapping[str, float]) -> dict[str, torch.Tensor]:
        """The adapted weight of every target for an expert (cached) or a mixture."""
        if isinstance(task, str) and task in self._cache:
            return self._cache[task]
        z = self._mixture(task)
        out = {}
        for p in self.svd:
            out[p] = self.base[p] + self.delta(p, z[p])
        if isinstance(task, str):
            self._cache[task] = out
        return out

    # -- applying ----------------------------------------------------------------------------
    @torch.no_grad()
    def apply(
        self, model: nn.Module, task: str | Mapping[str, float] | None, force: bool = False
    ) -> None:
        """Write the adapted weights into ``model``'s target weights in place.

        An expert (or the base) that this object wrote into ``model`` last, into the same
        storage, is not written again (0.39 ms saved per request for the seed model) unless
        ``force``: pass ``force=True`` after changing the weights by other means (a merged
        LoRA, ``load_state_dict``).

        Args:
            model: the base model (or a copy of it, e.g. ``optimize()``'s): its targets must
                have the shapes of the base weights.
            task: an expert's name, a ``{name: alpha}`` mixture, or ``None`` for the base.
            force: write even if ``task`` is what this object wrote last.
        """
        # What this object last wrote lives on the model itself (a deepcopy carries it along
        # with the weights it describes; a new model has none, even at a reused address).
        key = None
        if task is None or isinstance(task, str):
            key = (id(self), task or "", self._ptr(model))
        if not force and key is not None and model.__dict__.get(_APPLIED) == key:
            return
        new = self.base if task is None else self.weights(task)
        model.__dict__.pop(_APPLIED, None)  # a failed write leaves nothing trusted
        for p, w in new.items():
            dst = _weight(model, p)
            if dst.shape != w.shape:
                raise AdapterError(f"model: {p} has shape {tuple(dst.shape)}, not {tuple(w.shape)}")
            dst.copy_(w)
        if key is not None:
            model.__dict__[_APPLIED] = key

    def set_feature_module(
        self, model: nn.Module, feature_module: str, keep_classifier: bool = False
    ) -> None:
        """Read the first pass's features from ``feature_module``; a fitted classifier read
        another module's and is dropped (refit it) unless ``keep_classifier``."""
        if not isinstance(feature_module, str):
            raise AdapterError(f"feature_module must be a str, got {short_repr(feature_module)}")
        try:
            model.get_submodule(feature_module)
        except AttributeError:
            raise AdapterError(
                f"feature_module: the model has no module {feature_module!r}"
            ) from None
        if not keep_classifier and feature_module != getattr(self, "feature_module", None):
            self.classifier = None
        self.feature_module = feature_module

    def _ptr(self, model: nn.Module) -> tuple[int, ...]:
        return tuple(_weight(model, p).data_ptr() for p in self.paths)

    def restore(self, model: nn.Module) -> None:
        """Write the exact base weights back into ``model``."""
        self.apply(model, None)

    # -- the first pass ----------------------------------------------------------------------
    @torch.no_grad()
    def features(self, model: nn.Module, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``(batch, 2 * hidden)``: the final hidden state at the last prompt token and its mean
        over the prompt, from one forward of ``model`` (with whatever weights it holds)."""
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2:
            raise AdapterError(
                f"prompt_ids must be a 2-D (batch, seq) tensor, got {short_repr(prompt_ids)}"
            )
        seen: list[torch.Tensor] = []

        def grab(_m, _a, y):
            seen.append(y)
            raise _Stop  # the rest of the forward (the output head) is not needed

        handle = model.get_submodule(self.feature_module).register_forward_hook(grab)
        try:
            model(prompt_ids)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise AdapterError(f"model: its forward never ran {self.feature_module!r}")
        h = seen[-1]
        return torch.cat([h[:, -1], h.mean(1)], dim=-1)

    def fit_classifier(
        self, feats: torch.Tensor, labels: torch.Tensor, steps: int = 300, lr: float = 0.05
    ) -> float:
        """Fit the linear skill classifier on ``(n, f)`` features and ``(n,)`` expert indices
        (order of :attr:`names`); returns its training accuracy."""
        mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
        x = (feats - mean) / std
        lin = nn.Linear(x.shape[1], len(self.names))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
            lin.bias.zero_()
        opt = torch.optim.Adam(lin.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                loss = nn.functional.cross_entropy(lin(x), labels)
                loss = loss + 1e-4 * lin.weight.square().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.classifier = {
            "weight": lin.weight.detach().clone(),
            "bias": lin.bias.detach().clone(),
            "mean": mean,
            "std": std,
        }
        return float((lin(x).argmax(1) == labels).float().mean())

    def scores(self, model: nn.Module, prompt_ids: torch.Tensor) -> torch.Tensor:
        """``(batch, experts)`` classifier probabilities from the first pass."""
        if self.classifier is None:
            raise AdapterError("the skill classifier is not fitted (fit_classifier or load)")
        c = self.classifier
        x = (self.features(model, prompt_ids) - c["mean"]) / c["std"]
        return torch.softmax(x @ c["weight"].T + c["bias"], dim=-1)

    def identify(self, model: nn.Module, prompt_ids: torch.Tensor) -> list[str]:
        """The expert each prompt row needs, from one base-weight forward (the first pass).

        The model must hold its base weights (call :meth:`restore` after an :meth:`apply`).
        """
        return [self.names[i] for i in self.scores(model, prompt_ids).argmax(1).tolist()]

    def mixture(self, model: nn.Module, prompt_ids: torch.Tensor) -> dict[str, float]:
        """The alpha-mixture for a prompt batch: the classifier's mean probabilities."""
        p = self.scores(model, prompt_ids).mean(0)
        return {n: float(a) for n, a in zip(self.names, p.tolist(), strict=True)}

    # -- files -------------------------------------------------------------------------------
    def save(self, folder: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write the z-vectors and the classifier (not the SVD: it is recomputed on load)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {f"z.{n}.{p}": v for n, z in self.experts.items() for p, v in z.items()}
        if self.classifier is not None:
            state.update({f"classifier.{k}": v for k, v in self.classifier.items()})
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE))
        cfg = {
            "targets": list(self.targets),
            "paths": self.paths,
            "base_fingerprint": self.base_fingerprint,
            "feature_module": self.feature_module,
            "block": self.block,
            "experts": self.names,
            "meta": meta or {},
        }
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module) -> SVFExperts:
        """Experts written by :meth:`save`, over ``model`` (its SVD computed here, once)."""
        folder = Path(folder)
        cfile, wfile = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for f in (cfile, wfile):
            if not f.is_file():
                raise AdapterError(f"folder {str(folder)!r} has no {f.name}")
        cfg = json.loads(cfile.read_text())
        svf = cls(model, tuple(cfg["targets"]), cfg["feature_module"], cfg.get("block"))
        if svf.paths != cfg["paths"]:
            raise AdapterError(f"{cfile}: targets {cfg['paths']} are not the model's {svf.paths}")
        saved = cfg.get("base_fingerprint")  # absent in files written before it was recorded
        if saved is not None and saved != svf.base_fingerprint:
            raise AdapterError(
                f"model: the experts in {str(folder)!r} were trained over another base model "
                f"(target weights fingerprint {saved}, this model's {svf.base_fingerprint}); "
                "a z-vector scales its own base's singular directions"
            )
        state = load_file(str(wfile))
        for n in cfg["experts"]:
            svf.add_expert(n, {p: state[f"z.{n}.{p}"] for p in svf.paths})
        if "classifier.weight" in state:
            keys = ("weight", "bias", "mean", "std")
            svf.classifier = {k: state[f"classifier.{k}"] for k in keys}
        svf.meta = cfg.get("meta", {})
        return svf


def svf_forward_hooks(
    model: nn.Module, svf: SVFExperts, z: Mapping[str, torch.Tensor]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks adding ``(W' - W) x`` to each target's output, with gradients to ``z``:
    how the z-vectors train through the frozen base model. ``z[path]`` is ``(k,)`` (one expert
    for every row: ``W' - W`` is formed once) or ``(batch, k)`` (one expert per row, plain SVF
    only). Remove the handles after."""
    handles = []
    for p in svf.paths:
        zp = z[p]
        if zp.dim() == 1:
            d = svf.delta(p, zp)

            def hook(_m, args, y, d=d):
                return y + args[0] @ d.T

        elif p in svf.grid:
            raise AdapterError("z: one expert per row needs plain SVF (block=None)")
        else:
            u, s, vh = svf.svd[p]

            def hook(_m, args, y, u=u, s=s, vh=vh, zp=zp):
                h = (args[0] @ vh.T) * (s * (zp - 1.0))[:, None, :]
                return y + h @ u.T

        handles.append(model.get_submodule(p).register_forward_hook(hook))
    return handles
