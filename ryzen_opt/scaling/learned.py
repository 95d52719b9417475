"""``LearnedVerifier``: a small scorer of (prompt, completion) trained on the model's own samples.

The scorer reads prompt + completion with a frozen copy of the policy (a causal transformer
of the baseline's architecture) and feeds a small MLP head with the hidden state at the
completion's last token (which, causally, has seen everything) and the completion's mean and
minimum token log-probability. The head is trained with binary cross-entropy on the policy's
own samples labelled by the task's checker: ``python -m ryzen_opt.scaling.train_verifier``.

Files: ``verifier.safetensors`` (weights) and ``verifier.yaml`` (shape, task, training
metrics). Nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ryzen_opt.models.config import ConfigError, ModelConfig
from ryzen_opt.models.model import SimpleTransformerModel

WEIGHTS_NAME = "verifier.safetensors"
META_NAME = "verifier.yaml"
PAD_ID = 0  # right padding; the score is read before it, so causal attention never sees it


class LearnedVerifier(nn.Module):
    """Scores how likely a completion is correct, from its token ids.

    A frozen copy of the policy reads prompt + completion; a small trained head scores the
    features: the final hidden state at the completion's last token, and the mean and the
    minimum log-probability the backbone gives the completion's tokens (a wrong digit is
    often one the policy found unlikely). Features are standardised with statistics of the
    training set, stored with the weights.

    Args:
        config: the backbone's shape (its ``vocab_size`` may be smaller than the policy's:
            ids outside it are read as ``PAD_ID``).
        meta: free-form facts saved with the weights (task, training metrics).
        hidden: width of the head's hidden layer.

    Example:
        >>> from ryzen_opt.models import ModelConfig
        >>> v = LearnedVerifier(ModelConfig(vocab_size=17, embedding_dim=32, num_heads=2,
        ...                                 num_layers=1, ff_dim=64, max_seq_len=32))
        >>> len(v.score([[1, 4, 5]], [[6, 2]]))
        1
    """

    def __init__(
        self, config: ModelConfig, meta: dict[str, Any] | None = None, hidden: int = 64
    ) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.hidden = int(hidden)
        self.backbone = SimpleTransformerModel(config)
        self.backbone.requires_grad_(False)
        width = config.embedding_dim + 2
        self.register_buffer("feat_mean", torch.zeros(width))
        self.register_buffer("feat_std", torch.ones(width))
        self.score_head = nn.Sequential(
            nn.Linear(width, self.hidden), nn.GELU(), nn.Linear(self.hidden, 1)
        )
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def from_policy(
        cls, policy: SimpleTransformerModel, vocab_size: int | None = None, hidden: int = 64
    ) -> LearnedVerifier:
        """A verifier whose frozen backbone is a copy of ``policy``'s weights.

        Args:
            policy: the model whose samples will be scored.
            vocab_size: keep only the first ``vocab_size`` token embeddings (the task's ids);
                default: all.
            hidden: width of the head's hidden layer.

        Returns:
            The verifier, head untrained.
        """
        pc = policy.config
        v = pc.vocab_size if vocab_size is None else min(vocab_size, pc.vocab_size)
        cfg = ModelConfig(**{**pc.to_dict(), "vocab_size": v, "dropout": 0.0})
        ver = cls(cfg, hidden=hidden)
        state = {k: t.detach().clone() for k, t in policy.state_dict().items()}
        state["tok_emb.weight"] = state["tok_emb.weight"][:v]
        state["head.weight"] = (
            state["tok_emb.weight"] if cfg.tie_weights else state["head.weight"][:v]
        )
        ver.backbone.load_state_dict(state)
        return ver.to(next(policy.parameters()).device)

    @property
    def device(self) -> torch.device:
        return self.feat_mean.device

    @torch.no_grad()
    def features(
        self, ids: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor
    ) -> torch.Tensor:
        """Raw features ``(B, embedding_dim + 2)`` of right-padded pairs (see the class)."""
        bb = self.backbone
        bb.eval()
        ids = torch.where(ids < self.config.vocab_size, ids, torch.full_like(ids, PAD_ID))
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = bb.tok_emb(ids) + bb.pos_emb(pos)[None]
        for block in bb.blocks:
            x, _ = block(x)
        h = bb.ln_f(x)
        rows = torch.arange(ids.shape[0], device=ids.device)
        last = h[rows, lengths - 1]
        lp = torch.log_softmax(bb.head(h[:, :-1]).float(), dim=-1)
        lp = lp.gather(2, ids[:, 1:, None])[:, :, 0]  # lp[:, t]: token t + 1 given the prefix
        t = pos[None, 1:]
        mask = (t >= starts[:, None]) & (t < lengths[:, None])
        count = mask.sum(1).clamp_min(1)
        mean = torch.where(mask, lp, 0.0).sum(1) / count
        low = torch.where(mask, lp, float("inf")).amin(1)
        low = torch.where(mask.any(1), low, 0.0)
        return torch.cat([last.float(), mean[:, None], low[:, None]], dim=1)

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Score logits ``(B,)`` of raw features."""
        return self.score_head((feats - self.feat_mean) / self.feat_std)[:, 0]

    def forward(
        self, ids: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor
    ) -> torch.Tensor:
        """Score logits ``(B,)`` for right-padded ``ids`` ``(B, L)``: ``lengths`` tokens each,
        the completion starting at ``starts``."""
        return self.head_logits(self.features(ids, lengths, starts))

    def batch(
        self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, lengths and completion starts, on the verifier's device."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"prompts ({len(prompts)}) and completions ({len(completions)}) must pair up"
            )
        seqs = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
        limit = self.config.max_seq_len
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"pair {i} has no tokens")
            if len(s) > limit:
                raise ValueError(f"pair {i} has {len(s)} tokens, more than max_seq_len={limit}")
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        starts = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        return ids.to(self.device), lengths.to(self.device), starts.to(self.device)

    @torch.no_grad()
    def score(
        self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
    ) -> list[float]:
        """Probability-like scores in (0, 1) that each completion is correct.

        Args:
            prompts: prompt ids (BOS included), one per completion.
            completions: sampled ids (EOS included when produced).

        Returns:
            One float per pair.
        """
        if not prompts:
            return []
        was_training = self.training
        self.eval()
        try:
            ids, lengths, starts = self.batch(prompts, completions)
            return torch.sigmoid(self(ids, lengths, starts).float()).tolist()
        finally:
            self.train(was_training)

    # -- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``verifier.safetensors`` and ``verifier.yaml`` into folder ``path``.

        Returns:
            The folder.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: t.detach().cpu().contiguous() for k, t in self.state_dict().items()}
        if self.config.tie_weights:
            state.pop("backbone.head.weight")  # the same tensor as the token embedding
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        meta = {"model": self.config.to_dict(), "head_hidden": self.hidden, **self.meta}
        (path / META_NAME).write_text(yaml.safe_dump(meta, sort_keys=False))
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> LearnedVerifier:
        """Load a verifier saved by :meth:`save`; a missing or corrupt file raises naming it.

        Args:
            path: the folder.
            map_location: device for the weights.

        Returns:
            The verifier, in eval mode.
        """
        path = Path(path)
        meta_file, wfile = path / META_NAME, path / WEIGHTS_NAME
        if not meta_file.is_file():
            raise ValueError(f"verifier metadata {str(meta_file)!r} does not exist")
        try:
            meta = yaml.safe_load(meta_file.read_text())
            config = ModelConfig.from_dict(meta.pop("model"))
        except (yaml.YAMLError, ConfigError, AttributeError, KeyError) as e:
            raise ValueError(f"verifier metadata {str(meta_file)!r} is invalid: {e}") from None
        if not wfile.is_file():
            raise ValueError(f"verifier weights {str(wfile)!r} do not exist")
        try:
            state = load_file(str(wfile))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"verifier weights {str(wfile)!r} are corrupt: {e}") from None
        ver = cls(config, meta, hidden=int(meta.pop("head_hidden", 64)))
        if config.tie_weights and "backbone.tok_emb.weight" in state:
            state["backbone.head.weight"] = state["backbone.tok_emb.weight"]
        try:
            ver.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(
                f"verifier weights {str(wfile)!r} do not match {str(meta_file)!r}: {e}"
            ) from None
        return ver.to(map_location).eval()
