"""Batched candidate sampling over one shared prompt prefill, with per-row stopping.

Three ways to draw the same candidates, so the fast one can be checked against the naive
ones on identical seeds:

* ``shared``: the prompt is prefilled once; its KV cache is expanded along the batch
  (``expand`` for one prompt, an index copy for several) to the n candidate rows, which then
  decode as one batch. A row that produced EOS leaves the batch (its cache rows are dropped).
* ``repeat``: the prompt is repeated n times and the (n, L) batch is prefilled, as
  ``num_return_sequences`` does in most libraries.
* ``separate``: n independent calls, one prefill and one decode per candidate.

Randomness is counter-based: the uniform that candidate ``j`` of prompt ``i`` uses at step
``t`` is a hash of ``(seed, i, j, t)`` (splitmix64), and a token is drawn by inverting the
row's cumulative distribution at that uniform. No generator state is shared between rows, so
a candidate does not depend on which other rows were in its batch, and candidate ``j`` at
n=64 is the same as candidate ``j`` at n=8.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ryzen_opt.scaling.config import SamplingConfig

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]
MODES = ("shared", "repeat", "separate")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    # splitmix64 finalizer: a bijection on uint64 with full avalanche.
    with np.errstate(over="ignore"):
        z = x
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def candidate_uniforms(
    seed: int, prompt_index: int, candidates: Sequence[int], steps: int
) -> np.ndarray:
    """Uniforms in [0, 1) for ``candidates`` of one prompt: ``(len(candidates), steps)``.

    Row ``r`` depends only on ``(seed, prompt_index, candidates[r])`` and the step.

    Args:
        seed: the sampling seed.
        prompt_index: the prompt's index.
        candidates: candidate indices.
        steps: uniforms per candidate (one per decode step).

    Returns:
        float64 array of shape ``(len(candidates), steps)``.

    Example:
        >>> candidate_uniforms(0, 0, [0, 1], 3).shape
        (2, 3)
    """
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed], dtype=np.uint64) * _GOLDEN + _GOLDEN)
        key = _mix(key ^ (np.uint64(prompt_index) * _GOLDEN + np.uint64(1)))
        cand = np.asarray(candidates, dtype=np.uint64)
        key = _mix(key ^ (cand * _GOLDEN + np.uint64(2)))  # (C,)
        t = np.arange(1, steps + 1, dtype=np.uint64)
        bits = _mix(key[:, None] + t[None, :] * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _filtered_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the mass before it reaches top_p (the top one always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, u: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """One token per row of ``(rows, vocab)`` float logits, drawn with the uniforms ``u``.

    Inverse-CDF sampling: the token is the first whose cumulative probability exceeds
    ``u * total``; tokens of zero probability are never chosen.

    Args:
        logits: ``(rows, vocab)`` float32 logits.
        u: ``(rows,)`` float64 uniforms in [0, 1).
        cfg: temperature, top-k and top-p.

    Returns:
        ``(rows,)`` int64 token ids.
    """
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(_filtered_logits(logits, cfg), dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    x = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, x, right=True)[:, 0].clamp_max(logits.shape[-1] - 1)


@dataclass
class RowResult:
    """One sampled candidate: token ids (through the first EOS), their log-probabilities."""

    prompt: int  # position of the prompt in its group
    candidate: int  # candidate index within the prompt
    tokens: list[int]
    logprobs: list[float]
    eos: bool  # ended with EOS (else it ran out of max_new_tokens)
    aborted: bool = False  # stopped early because a sibling was verified
    sampled: int = 0  # tokens sampled for this row (past its EOS too without stop_at_eos)


@dataclass
class DecodeStats:
    """Work done by one sampling call."""

    prefill_tokens: int = 0
    generated_tokens: int = 0  # every sampled token, aborted rows included
    forward_calls: int = 0
    rows: list[RowResult] = field(default_factory=list)


def prefill(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
    """Run the prompt ``(P, L)`` once; returns last-position float logits and the cache."""
    logits, cache = model(ids)
    return logits[:, -1, :].float(), cache


def _take_rows(cache: KVCache, index: torch.Tensor) -> KVCache:
    return tuple((k.index_select(0, index), v.index_select(0, index)) for k, v in cache)


def _expand_rows(cache: KVCache, rows: int) -> KVCache:
    # One prompt: a stride-0 view, no copy; the first decode step's cat materializes it.
    return tuple((k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])) for k, v in cache)


StopFn = Callable[[int, list[int]], bool]


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    last_logits: torch.Tensor,
    cache: KVCache,
    row_prompt: torch.Tensor,
    row_candidate: Sequence[int],
    uniforms: torch.Tensor,
    cfg: SamplingConfig,
    eos_id: int | None,
    stop_fn: StopFn | None = None,
    stats: DecodeStats | None = None,
) -> list[RowResult]:
    """Decode candidate rows as one batch from prefilled prompts.

    Args:
        model: ``forward(idx, kv_cache) -> (logits, cache)``.
        last_logits: ``(P, vocab)`` last-position logits of the P prefilled prompts.
        cache: the prompts' KV cache, batch P.
        row_prompt: ``(R,)`` long, which prompt each row continues (on the model's device).
        row_candidate: the candidate index of each row (for the results).
        uniforms: ``(R, max_new_tokens)`` float64 uniforms on the model's device.
        cfg: sampling settings.
        eos_id: EOS id, or None.
        stop_fn: called as ``stop_fn(prompt, tokens)`` when a row ends with EOS; returning
            True drops the prompt's other rows (early exit).
        stats: counters to add to.

    Returns:
        One :class:`RowResult` per row, in row order.
    """
    stats = DecodeStats() if stats is None else stats
    n_rows, steps = uniforms.shape
    p_count = last_logits.shape[0]
    if p_count == 1:
        logits = last_logits.expand(n_rows, -1)
        cache = _expand_rows(cache, n_rows)
    elif n_rows == p_count and row_prompt.tolist() == list(range(p_count)):
        logits = last_logits  # one row per prompt, in order (the repeated-prompt way)
    else:
        logits = last_logits.index_select(0, row_prompt)
        cache = _take_rows(cache, row_prompt)
    stop = eos_id is not None and cfg.stop_at_eos
    toks = torch.zeros(n_rows, steps, dtype=torch.long, device=uniforms.device)
    lps = torch.zeros(n_rows, steps, dtype=torch.float32, device=uniforms.device)
    ended = torch.full((n_rows,), -1, dtype=torch.long)  # step of the first EOS (host)
    last = torch.full((n_rows,), steps - 1, dtype=torch.long)  # last step sampled (host)
    aborted = torch.zeros(n_rows, dtype=torch.bool)
    active = torch.arange(n_rows, device=uniforms.device)
    active_host = list(range(n_rows))
    prompts_host = row_prompt.tolist()
    solved: set[int] = set()
    for t in range(steps):
        tok = pick_tokens(logits, uniforms[active, t], cfg)
        lp = torch.log_softmax(logits, dim=-1).gather(1, tok[:, None])[:, 0]
        toks[active, t] = tok
        lps[active, t] = lp
        stats.generated_tokens += len(active_host)
        keep = None
        if eos_id is not None:
            is_eos = tok == eos_id
            if bool(is_eos.any()):
                hits = is_eos.nonzero()[:, 0].tolist()
                for a in hits:
                    r = active_host[a]
                    if ended[r] < 0:
                        ended[r] = t
                        if stop_fn is not None and prompts_host[r] not in solved:
                            row_toks = toks[r, : t + 1].tolist()
                            if stop_fn(prompts_host[r], row_toks):
                                solved.add(prompts_host[r])
                if stop:
                    keep = ~is_eos
        if solved:
            in_solved = torch.tensor([prompts_host[r] in solved for r in active_host])
            keep_s = ~in_solved.to(tok.device)
            keep = keep_s if keep is None else keep & keep_s
        if keep is not None:
            keep_host = keep.tolist()
            for a, k in enumerate(keep_host):
                r = active_host[a]
                if not k:
                    last[r] = t
                    aborted[r] = bool(ended[r] < 0) and prompts_host[r] in solved
        if t == steps - 1:
            break
        if keep is not None:
            if not any(keep_host):
                break
            if not all(keep_host):
                idx = keep.nonzero()[:, 0]
                active = active.index_select(0, idx)
                active_host = [r for r, k in zip(active_host, keep_host, strict=True) if k]
                tok = tok.index_select(0, idx)
                cache = _take_rows(cache, idx)
        out, cache = model(tok[:, None], cache)
        logits = out[:, -1, :].float()
        stats.forward_calls += 1
    toks_h, lps_h = toks.cpu(), lps.cpu()
    results = []
    for r in range(n_rows):
        end = int(ended[r]) if ended[r] >= 0 else int(last[r])
        results.append(
            RowResult(
                prompt=prompts_host[r],
                candidate=int(row_candidate[r]),
                tokens=toks_h[r, : end + 1].tolist(),
                logprobs=lps_h[r, : end + 1].tolist(),
                eos=bool(ended[r] >= 0),
                aborted=bool(aborted[r]),
                sampled=int(last[r]) + 1,
            )
        )
    stats.rows.extend(results)
    return results


def _uniform_rows(
    cfg: SamplingConfig,
    prompt_indices: Sequence[int],
    candidates: Sequence[int],
    steps: int,
    device: torch.device,
) -> torch.Tensor:
    blocks = [candidate_uniforms(cfg.seed, i, candidates, steps) for i in prompt_indices]
    return torch.from_numpy(np.concatenate(blocks, axis=0)).to(device)


@torch.no_grad()
def sample_group(
    model: torch.nn.Module,
    ids: torch.Tensor,
    prompt_indices: Sequence[int],
    candidates: Sequence[int],
    max_new_tokens: int,
    cfg: SamplingConfig,
    eos_id: int | None,
    *,
    mode: str = "shared",
    stop_fn: StopFn | None = None,
    stats: DecodeStats | None = None,
    prefilled: tuple[torch.Tensor, KVCache] | None = None,
) -> list[RowResult]:
    """Sample ``candidates`` for each of the P same-length prompts ``ids`` ``(P, L)``.

    Args:
        model: ``forward(idx, kv_cache) -> (logits, cache)``.
        ids: ``(P, L)`` prompt ids on the model's device.
        prompt_indices: the seed index of each prompt.
        candidates: candidate indices to draw (the same for every prompt).
        max_new_tokens: decode steps at most.
        cfg: sampling settings.
        eos_id: EOS id or None.
        mode: ``"shared"``, ``"repeat"`` or ``"separate"`` (see the module docstring).
        stop_fn: early-exit hook (see :func:`decode`); ``shared`` mode only.
        stats: counters to add to.
        prefilled: ``shared`` mode: reuse this ``prefill(model, ids)`` result.

    Returns:
        Rows ordered by prompt, then candidate.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    stats = DecodeStats() if stats is None else stats
    p_count, n = ids.shape[0], len(candidates)
    device = ids.device
    if mode == "separate":
        rows: list[RowResult] = []
        for p in range(p_count):
            for j in candidates:
                u = _uniform_rows(cfg, [prompt_indices[p]], [j], max_new_tokens, device)
                logits, cache = prefill(model, ids[p : p + 1])
                stats.prefill_tokens += ids.shape[1]
                stats.forward_calls += 1
                row = decode(
                    model,
                    logits,
                    cache,
                    torch.zeros(1, dtype=torch.long, device=device),
                    [j],
                    u,
                    cfg,
                    eos_id,
                    None,
                    stats,
                )[0]
                row.prompt = p
                rows.append(row)
        return rows
    u = _uniform_rows(cfg, prompt_indices, candidates, max_new_tokens, device)
    row_prompt = torch.arange(p_count, device=device).repeat_interleave(n)
    row_cand = list(candidates) * p_count
    if mode == "repeat":
        logits, cache = prefill(model, ids.repeat_interleave(n, dim=0))
        stats.prefill_tokens += p_count * n * ids.shape[1]
        stats.forward_calls += 1
        ident = torch.arange(p_count * n, device=device)
        rows = decode(model, logits, cache, ident, row_cand, u, cfg, eos_id, None, stats)
        for r, p in zip(rows, row_prompt.tolist(), strict=True):
            r.prompt = p
        return rows
    if prefilled is None:
        prefilled = prefill(model, ids)
        stats.prefill_tokens += p_count * ids.shape[1]
        stats.forward_calls += 1
    logits, cache = prefilled
    return decode(model, logits, cache, row_prompt, row_cand, u, cfg, eos_id, stop_fn, stats)


@torch.no_grad()
def raw_logprobs(model: torch.nn.Module, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Log-probabilities the model gives tokens ``ids[:, start:]`` (teacher forcing).

    Args:
        model: ``forward(idx) -> (logits, cache)``.
        ids: ``(B, L)`` prompt followed by completion.
        start: the first completion position (the prompt length).

    Returns:
        ``(B, L - start)`` float32 log-probabilities.
    """
    logits, _ = model(ids)
    lp = F.log_softmax(logits[:, start - 1 : -1, :].float(), dim=-1)
    return lp.gather(2, ids[:, start:, None])[:, :, 0]
