"""``SimpleTransformerModel``: the untouched plain-PyTorch baseline.

A pre-LayerNorm GPT-style decoder: learned token and position embeddings, ``num_layers``
blocks of (LayerNorm -> causal self-attention through ``scaled_dot_product_attention``
(:mod:`ryzen_opt.models.attention`) ->
residual, LayerNorm -> Linear/GELU/Linear -> residual), a final LayerNorm and an output head
tied to the token embedding (``tie_weights=True``, the default).

This module is the baseline that every optimized path is measured against. Nothing in
ryzen_opt patches it: ``optimize()`` builds its own modules around a copy of the weights.

The KV cache is a tuple with one ``(k, v)`` pair per layer, each ``(batch, heads, seq,
head_dim)``; ``forward`` appends the new keys/values and returns the grown cache.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ryzen_opt.models.attention import causal_self_attention
from ryzen_opt.models.config import ModelConfig

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]
_F32_TINY = torch.finfo(torch.float32).tiny  # 1.18e-38


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.embedding_dim, 3 * cfg.embedding_dim)
        self.proj = nn.Linear(cfg.embedding_dim, cfg.embedding_dim)
        self.dropout = cfg.dropout

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return causal_self_attention(self, x, past)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embedding_dim, cfg.ff_dim)
        self.fc2 = nn.Linear(cfg.ff_dim, cfg.embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.embedding_dim, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.embedding_dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, past=None):
        a, present = self.attn(self.ln1(x), past)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, present


class SimpleTransformerModel(nn.Module):
    """Pre-LN GPT-style decoder in plain PyTorch; the baseline of every benchmark.

    Args:
        config: the model's shape (default: ``ModelConfig()``, the reference configuration).

    Example:
        >>> import torch
        >>> from ryzen_opt.models import ModelConfig, SimpleTransformerModel
        >>> m = SimpleTransformerModel(ModelConfig(num_layers=1)).eval()
        >>> logits, cache = m(torch.tensor([[1, 2, 3]]))
        >>> logits.shape
        torch.Size([1, 3, 2048])
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = ModelConfig() if config is None else config
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.embedding_dim)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def num_parameters(self) -> int:
        """Distinct trainable parameters (a tied head is counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _check_idx(self, idx: torch.Tensor, past_len: int) -> None:
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must hold int64/int32 token ids, got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"idx must be 2-D (batch, seq), got shape {tuple(idx.shape)}")
        if idx.shape[1] == 0:
            raise ValueError("idx must hold at least one token per row, got seq length 0")
        dev = self.tok_emb.weight.device
        if idx.device != dev:
            raise ValueError(f"idx is on {idx.device} but the model is on {dev}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ValueError(
                f"idx token ids must lie in [0, {self.config.vocab_size}), got min "
                f"{int(idx.min())} max {int(idx.max())}"
            )
        total = past_len + idx.shape[1]
        if total > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {total} (cache {past_len} + idx {idx.shape[1]}) exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )

    def _check_cache(self, kv_cache, batch: int | None) -> int:
        """The cached length of ``kv_cache``; raise naming it if it cannot serve this model.

        Shapes only (no values are read, so no device sync): ~4 us per layer here (51 us
        for 12 layers, measured); generation skips it and checks its arguments once.
        """
        n = len(self.blocks)
        what = "kv_cache must be None or the cache returned by forward (one (k, v) per layer)"
        try:
            layers = len(kv_cache)
        except TypeError:
            raise TypeError(f"{what}, got {type(kv_cache).__name__}") from None
        if layers != n:
            raise ValueError(f"kv_cache must have one (k, v) per layer ({n}), got {layers}")
        dev = self.tok_emb.weight.device
        past = None
        for i in range(n):
            try:
                pair = kv_cache[i]
            except Exception:
                raise TypeError(f"{what}, got {type(kv_cache).__name__}") from None
            if not (
                isinstance(pair, (tuple, list))
                and len(pair) == 2
                and all(isinstance(t, torch.Tensor) for t in pair)
            ):
                raise TypeError(
                    f"kv_cache[{i}] must be a (k, v) pair of tensors, got {type(pair).__name__}"
                )
            # Each layer's own attention shape: a pruned layer keeps fewer heads than the config.
            attn = self.blocks[i].attn
            heads, hd = attn.num_heads, attn.head_dim
            want = f"(batch={batch}, heads={heads}, seq, head_dim={hd})"
            for name, t in zip("kv", pair, strict=True):
                shape = tuple(t.shape)
                if (
                    t.dim() != 4
                    or (batch is not None and shape[0] != batch)
                    or shape[1] != heads
                    or shape[3] != hd
                ):
                    raise ValueError(f"kv_cache[{i}] {name} must be {want}, got shape {shape}")
                if not t.is_floating_point() or t.device != dev:
                    raise ValueError(
                        f"kv_cache[{i}] {name} must be floating point on {dev}, got "
                        f"{t.dtype} on {t.device}"
                    )
                if past is None:
                    past = shape[2]
                elif shape[2] != past:
                    raise ValueError(
                        f"kv_cache[{i}] {name} holds {shape[2]} positions, kv_cache[0] k "
                        f"holds {past}: every layer must hold the same number"
                    )
        return past

    def forward(
        self, idx: torch.Tensor, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """Logits for ``idx`` given an optional KV cache of earlier tokens.

        Args:
            idx: ``(batch, seq)`` token ids.
            kv_cache: the cache returned by an earlier call, or ``None``.

        Returns:
            ``(logits, kv_cache)``: ``(batch, seq, vocab_size)`` float logits and the cache
            extended by ``idx``.

        Raises:
            TypeError / ValueError naming ``idx`` or ``kv_cache``: ids that are not a 2-D
            integer tensor of in-vocabulary ids, or a cache that is not one ``(k, v)`` pair
            per layer of shape ``(batch, num_heads, seq, head_dim)`` on the model's device.
        """
        past_len = 0
        if kv_cache is not None:
            batch = idx.shape[0] if isinstance(idx, torch.Tensor) and idx.dim() == 2 else None
            past_len = self._check_cache(kv_cache, batch)
        self._check_idx(idx, past_len)
        return self._forward(idx, kv_cache, past_len)

    def _forward(
        self, idx: torch.Tensor, kv_cache: KVCache | None, past_len: int
    ) -> tuple[torch.Tensor, KVCache]:
        # Unchecked: generation validates the prompt once; the ids it feeds back are sampled
        # from the vocabulary, and re-reading them every step would sync a GPU per token.
        t = idx.shape[1]
        pos = torch.arange(past_len, past_len + t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos)[None])
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, None if kv_cache is None else kv_cache[i])
            presents.append(present)
        return self.head(self.ln_f(x)), tuple(presents)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``idx`` (see :func:`generate_stream`).

        Returns:
            ``(batch, seq + n)`` ids, ``n <= max_new_tokens``: generation ends early once
            every row has produced ``eos_id``. Rows that stopped are padded with ``eos_id``.
        """
        new = list(
            self.generate_stream(
                idx, max_new_tokens, temperature, top_k, top_p, eos_id, seed, use_cache
            )
        )
        if not new:
            return idx
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1)

    def _check_generation(
        self, idx, max_new_tokens, temperature, top_k, top_p, eos_id, seed=None
    ) -> None:
        """Raise, naming the argument, for settings or a prompt generation cannot serve.

        Runs once per generate call; the token loop itself checks nothing (no host sync).
        """
        check_sampling_args(max_new_tokens, temperature, top_k, top_p, eos_id, self.config)
        check_seed(seed)
        self._check_idx(idx, 0)
        if idx.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt length {idx.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield one ``(batch,)`` tensor of new token ids per step, as they are produced.

        Args:
            idx: ``(batch, seq)`` prompt ids (one length for the batch).
            max_new_tokens: at most this many steps; ``seq + max_new_tokens`` must fit in
                ``max_seq_len``.
            temperature: 0 for greedy decoding, else the softmax temperature.
            top_k: keep only the ``top_k`` most likely tokens (sampling only).
            top_p: nucleus sampling threshold in (0, 1] (sampling only).
            eos_id: a row that produces it stops (later positions repeat ``eos_id``); the
                stream ends when every row has stopped.
            seed: seeds a private generator, so sampling is deterministic for a seed.
            use_cache: ``False`` recomputes the whole prefix each step (for testing).
        """
        self._check_generation(idx, max_new_tokens, temperature, top_k, top_p, eos_id, seed)
        gen = make_generator(seed, idx.device)
        was_training = self.training
        self.eval()
        try:
            done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
            seq = idx
            length = idx.shape[1]
            logits, cache = self._forward(idx, None, 0)
            for step in range(max_new_tokens):
                nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, gen)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done = done | (nxt == eos_id)
                yield nxt
                if (eos_id is not None and bool(done.all())) or step == max_new_tokens - 1:
                    return
                length += 1
                if use_cache:
                    logits, cache = self._forward(nxt[:, None], cache, length - 1)
                else:
                    seq = torch.cat([seq, nxt[:, None]], dim=1)
                    logits, _ = self._forward(seq, None, 0)
        finally:
            self.train(was_training)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def state_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``state_dict`` names and shapes of ``SimpleTransformerModel(config)``, in its order.

    Computed without building anything: even a meta-device model costs 2 s on first use
    (the modules' initialisers load torch's decompositions). A test keeps it equal to the
    model's own ``state_dict``.
    """
    d, f, v = config.embedding_dim, config.ff_dim, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "tok_emb.weight": (v, d),
        "pos_emb.weight": (config.max_seq_len, d),
    }
    block = {
        "ln1.weight": (d,),
        "ln1.bias": (d,),
        "attn.qkv.weight": (3 * d, d),
        "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d),
        "attn.proj.bias": (d,),
        "ln2.weight": (d,),
        "ln2.bias": (d,),
        "mlp.fc1.weight": (f, d),
        "mlp.fc1.bias": (f,),
        "mlp.fc2.weight": (d, f),
        "mlp.fc2.bias": (d,),
    }
    for i in range(config.num_layers):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,), "head.weight": (v, d)})
    return shapes


def check_sampling_args(max_new_tokens, temperature, top_k, top_p, eos_id, cfg) -> None:
    """Validate generation settings; raise naming the argument.

    Types raise TypeError (a bool is not an id or a count), values ValueError.
    """
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r:.200}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not _is_real(temperature):
        raise TypeError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r:.200}")
    # Below float32's smallest normal number the divisor rounds to 0 in the float32 logits.
    if not (temperature == 0 or _F32_TINY <= temperature < math.inf):
        raise ValueError(
            f"temperature must be 0 (greedy) or a finite number >= {_F32_TINY:.3g}, got "
            f"{temperature!r}"
        )
    if top_k is not None and not _is_int(top_k):
        raise TypeError(f"top_k must be None or an int >= 1, got {top_k!r:.200}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not _is_real(top_p):
        raise TypeError(f"top_p must be None or a number in (0, 1], got {top_p!r:.200}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if eos_id is not None and not _is_int(eos_id):
        raise TypeError(f"eos_id must be None or an int id, got {eos_id!r:.200}")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id must be None or an id in [0, {cfg.vocab_size}), got {eos_id!r}")


def check_seed(seed) -> None:
    """``seed`` must be ``None`` or an int that ``torch.Generator.manual_seed`` takes."""
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be None or an int in [0, 2**64), got {seed!r:.200}")
    if seed is not None and not 0 <= seed < 2**64:
        raise ValueError(f"seed must be None or an int in [0, 2**64), got {seed!r}")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A private generator for ``seed`` (``None``: use the global RNG)."""
    check_seed(seed)
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick one id per row from ``(batch, vocab)`` logits (greedy when temperature == 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # The row maximum first: every scaled logit is then <= 0, so a tiny temperature gives
    # -inf for the others and 0 for the best, never inf - inf = nan.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top one always stays).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
