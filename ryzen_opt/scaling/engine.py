"""``InferenceScalingEngine``: best-of-n sampling with verification.

Sample n candidates per prompt (one shared prefill, one decode batch, per-row stopping),
score them (programmatic verifier, votes, a learned verifier, the model's log-probability)
and return the chosen completion with every candidate and what it cost.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from ryzen_opt.scaling.config import SamplingConfig
from ryzen_opt.scaling.sampling import MODES, DecodeStats, RowResult, prefill, sample_group
from ryzen_opt.scaling.selection import (
    STRATEGIES,
    select_majority,
    select_max,
    select_verified,
    select_weighted_vote,
)
from ryzen_opt.scaling.verifiers import TaskVerifier, as_verifier

Prompt = str | Sequence[int] | torch.Tensor


class Scorer(Protocol):
    """A learned verifier: probability-like scores of (prompt, completion) id pairs."""

    def score(
        self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
    ) -> list[float]: ...


@dataclass
class Candidate:
    """One sampled completion and its scores."""

    index: int  # candidate index j: its randomness comes from (seed, prompt index, j)
    completion: str
    token_ids: list[int]  # sampled ids, the EOS included when one was produced
    eos: bool  # ended with EOS (else it ran out of max_new_tokens)
    answer: str | None  # extracted final answer (None: states none)
    verified: bool  # the programmatic verifier's verdict
    logprob: float  # sum of the model's log-probabilities of token_ids (temperature 1)
    mean_logprob: float
    learned_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Counters:
    """What one prompt's best-of-n cost. Times in seconds; a group's time is split evenly."""

    prompt_tokens: int
    prefill_tokens: int = 0  # tokens run through the model for the prompt
    generated_tokens: int = 0  # sampled tokens, those of rows cut by an early exit included
    candidates: int = 0  # complete candidates returned
    early_exit: bool = False  # stopped before n candidates because one was verified
    sample_s: float = 0.0
    verify_s: float = 0.0
    learned_s: float = 0.0

    @property
    def wall_s(self) -> float:
        return self.sample_s + self.verify_s + self.learned_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["wall_s"] = self.wall_s
        return d


@dataclass
class BestOfNResult:
    """The chosen completion of one prompt, all candidates and the counters."""

    prompt: str
    completion: str
    index: int  # position of the chosen candidate in ``candidates``
    strategy: str
    candidates: list[Candidate]
    choices: dict[str, int]  # every computable strategy -> chosen position
    counters: Counters = field(default_factory=lambda: Counters(0))

    @property
    def correct(self) -> bool:
        """The programmatic verifier accepts the chosen completion."""
        return self.candidates[self.index].verified

    @property
    def covered(self) -> bool:
        """At least one candidate is verified correct."""
        return any(c.verified for c in self.candidates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "completion": self.completion,
            "index": self.index,
            "strategy": self.strategy,
            "correct": self.correct,
            "covered": self.covered,
            "choices": dict(self.choices),
            "counters": self.counters.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
        }


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class InferenceScalingEngine:
    """Best-of-n sampling with verification over one shared prompt prefill.

    Args:
        model: any module with ``forward(idx, kv_cache=None) -> (logits, cache)`` and a
            per-layer ``(k, v)`` cache of shape ``(batch, heads, seq, head_dim)`` (the
            baseline :class:`~ryzen_opt.models.SimpleTransformerModel` or an optimized one);
            it runs on the device of its parameters.
        verifier: a :class:`TaskVerifier`, or a task with ``verify``, ``extract_answer`` and
            ``tokenizer`` (e.g. :class:`~ryzen_opt.models.ArithmeticTask`).
        sampler: how candidates are drawn.
        learned_verifier: a scorer (e.g. :class:`~ryzen_opt.scaling.LearnedVerifier`) for
            the ``learned`` and ``weighted_vote`` strategies, or None.
        strategy: the default selection strategy, one of :data:`STRATEGIES`.
        max_batch_rows: same-length prompts are sampled together while prompts x n stays
            within this many rows.

    Example:
        >>> from ryzen_opt.models import ArithmeticTask, ModelConfig, SimpleTransformerModel
        >>> task = ArithmeticTask(digits=1)
        >>> model = SimpleTransformerModel(ModelConfig(vocab_size=32, embedding_dim=32,
        ...     num_heads=2, num_layers=1, ff_dim=64, max_seq_len=32))
        >>> engine = InferenceScalingEngine(model, task, sampler=SamplingConfig(seed=1))
        >>> [r] = engine.best_of_n(["3+4="], n=4, max_new_tokens=3)
        >>> len(r.candidates), r.counters.prefill_tokens
        (4, 5)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        verifier: Any,
        *,
        sampler: SamplingConfig | None = None,
        learned_verifier: Scorer | None = None,
        strategy: str = "verifier",
        max_batch_rows: int = 1024,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.verifier: TaskVerifier = as_verifier(verifier)
        sampler = SamplingConfig() if sampler is None else sampler
        if not isinstance(sampler, SamplingConfig):
            raise TypeError(f"sampler must be a SamplingConfig, got {type(sampler).__name__}")
        self.sampler = sampler
        if learned_verifier is not None and not callable(getattr(learned_verifier, "score", None)):
            raise TypeError("learned_verifier must have a score(prompts, completions) method")
        self.learned_verifier = learned_verifier
        self._check_strategy(strategy, "strategy")
        self.strategy = strategy
        if not _is_int(max_batch_rows) or max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be an int >= 1, got {max_batch_rows!r}")
        self.max_batch_rows = max_batch_rows

    # -- properties ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (CPU for a model without parameters)."""
        p = next(iter(self.model.parameters()), None)
        return torch.device("cpu") if p is None else p.device

    @property
    def eos_id(self) -> int | None:
        return self.sampler.eos_id if self.sampler.eos_id is not None else self.verifier.eos_id

    @property
    def max_seq_len(self) -> int | None:
        return getattr(getattr(self.model, "config", None), "max_seq_len", None)

    def strategies(self) -> tuple[str, ...]:
        """The strategies this engine can compute (``learned`` needs a learned verifier)."""
        return tuple(s for s in STRATEGIES if s != "learned" or self.learned_verifier)

    def _check_strategy(self, strategy: Any, name: str) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"{name} must be one of {STRATEGIES}, got {strategy!r}")
        if strategy == "learned" and self.learned_verifier is None:
            raise ValueError(f"{name}='learned' needs a learned_verifier")

    # -- input -----------------------------------------------------------------------------
    def _encode(self, prompts: Any, max_new_tokens: int) -> tuple[list[str], list[list[int]]]:
        if isinstance(prompts, (str, torch.Tensor)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty sequence of prompts (str or token ids)")
        texts, ids = [], []
        limit = self.max_seq_len
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if not p:
                    raise ValueError(f"prompts[{i}] is an empty string")
                text, tok = p, self.verifier.encode(p)
            elif isinstance(p, torch.Tensor) or (
                isinstance(p, Sequence) and all(_is_int(t) for t in p)
            ):
                tok = p.tolist() if isinstance(p, torch.Tensor) else list(p)
                if isinstance(p, torch.Tensor) and p.dim() != 1:
                    raise ValueError(
                        f"prompts[{i}] must be 1-D token ids, got shape {tuple(p.shape)}"
                    )
                text = self.verifier.decode(tok)
            else:
                raise TypeError(
                    f"prompts[{i}] must be a str or a sequence of int token ids, "
                    f"got {type(p).__name__}"
                )
            if len(tok) == 0:
                raise ValueError(f"prompts[{i}] encodes to zero tokens")
            if limit is not None and len(tok) > limit:
                raise ValueError(
                    f"prompts[{i}] has {len(tok)} tokens, longer than the model's "
                    f"max_seq_len={limit}"
                )
            if limit is not None and len(tok) + max_new_tokens > limit:
                raise ValueError(
                    f"prompts[{i}] length {len(tok)} + max_new_tokens "
                    f"{max_new_tokens} exceeds the model's max_seq_len={limit}"
                )
            texts.append(text)
            ids.append(tok)
        return texts, ids

    def _groups(self, ids: list[list[int]], n: int) -> list[list[int]]:
        per = max(1, self.max_batch_rows // n)
        by_len: dict[int, list[int]] = {}
        for i, t in enumerate(ids):
            by_len.setdefault(len(t), []).append(i)
        return [g[k : k + per] for g in by_len.values() for k in range(0, len(g), per)]

    # -- sampling --------------------------------------------------------------------------
    def _sample(
        self,
        ids: torch.Tensor,
        texts: list[str],
        indices: list[int],
        n: int,
        max_new_tokens: int,
        mode: str,
        early_exit: bool,
        chunk: int,
        stats: DecodeStats,
    ) -> tuple[list[RowResult], set[int]]:
        cfg, eos = self.sampler, self.eos_id
        if not early_exit:
            rows = sample_group(
                self.model,
                ids,
                indices,
                list(range(n)),
                max_new_tokens,
                cfg,
                eos,
                mode=mode,
                stats=stats,
            )
            return rows, set()
        solved: set[int] = set()
        seen: dict[tuple[int, tuple[int, ...]], bool] = {}

        def stop_fn(p: int, toks: list[int]) -> bool:
            key = (p, tuple(toks))
            if key not in seen:
                seen[key] = self.verifier.verify(texts[p], self.verifier.decode(toks))
            return seen[key]

        logits, cache = prefill(self.model, ids)
        stats.prefill_tokens += ids.numel()
        stats.forward_calls += 1
        rows: list[RowResult] = []
        for start in range(0, n, chunk):
            open_ = [p for p in range(ids.shape[0]) if p not in solved]
            if not open_:
                break
            sel = torch.tensor(open_, device=ids.device)
            sub = (
                logits.index_select(0, sel),
                tuple((k.index_select(0, sel), v.index_select(0, sel)) for k, v in cache),
            )
            got = sample_group(
                self.model,
                ids.index_select(0, sel),
                [indices[p] for p in open_],
                list(range(start, min(n, start + chunk))),
                max_new_tokens,
                cfg,
                eos,
                stop_fn=lambda q, toks, open_=open_: stop_fn(open_[q], toks),
                stats=stats,
                prefilled=sub,
            )
            for r in got:
                r.prompt = open_[r.prompt]
                if r.eos and not r.aborted and stop_fn(r.prompt, r.tokens):
                    solved.add(r.prompt)
            rows.extend(got)
        return rows, solved

    def _candidates(self, text: str, rows: list[RowResult]) -> tuple[list[Candidate], float]:
        t0 = time.perf_counter()
        out = []
        for r in sorted(rows, key=lambda r: r.candidate):
            if r.aborted:
                continue
            completion = self.verifier.decode(r.tokens)
            lp = float(sum(r.logprobs))
            out.append(
                Candidate(
                    index=r.candidate,
                    completion=completion,
                    token_ids=list(r.tokens),
                    eos=r.eos,
                    answer=self.verifier.extract_answer(completion),
                    verified=self.verifier.verify(text, completion),
                    logprob=lp,
                    mean_logprob=lp / max(1, len(r.tokens)),
                )
            )
        return out, time.perf_counter() - t0

    def _choices(self, cands: list[Candidate]) -> dict[str, int]:
        lp = [c.mean_logprob for c in cands]
        answers = [c.answer for c in cands]
        verified = [c.verified for c in cands]
        choices = {
            "verifier": select_verified(verified, lp),
            "majority": select_majority(answers, lp),
            "logprob": select_max(lp),
        }
        if self.learned_verifier is not None:
            scores = [float(c.learned_score) for c in cands]
            choices["learned"] = select_max(scores, lp)
            choices["weighted_vote"] = select_weighted_vote(answers, scores, lp)
        else:
            choices["weighted_vote"] = select_weighted_vote(
                answers, [float(v) for v in verified], lp
            )
        return choices

    @torch.no_grad()
    def best_of_n(
        self,
        prompts: Prompt | Sequence[Prompt],
        n: int,
        max_new_tokens: int,
        *,
        strategy: str | None = None,
        early_exit: bool = False,
        early_exit_chunk: int | None = None,
        index_offset: int = 0,
        mode: str = "shared",
    ) -> list[BestOfNResult]:
        """Sample ``n`` candidates per prompt, score them, return the best of each.

        Args:
            prompts: prompt texts (encoded by the verifier's tokenizer) or token-id sequences;
                a single str or 1-D tensor is one prompt.
            n: candidates per prompt (>= 1).
            max_new_tokens: tokens per candidate at most (>= 1); prompt length plus this must
                fit in the model's ``max_seq_len``.
            strategy: selection strategy (default: the engine's), one of :data:`STRATEGIES`.
            early_exit: stop a prompt's sampling once a candidate passes the programmatic
                verifier. Candidates are then drawn in rounds of ``early_exit_chunk`` and a
                round stops as soon as one row is verified; the candidates returned are those
                completed, a prefix-compatible subset of the n (same seeds).
            early_exit_chunk: candidates per round with ``early_exit`` (default:
                ``max(1, n // 4)``).
            index_offset: prompt ``k`` of this call seeds its candidates as prompt
                ``index_offset + k`` (to split one prompt set over several calls).
            mode: ``"shared"`` (one prefill, expanded), or the naive ``"repeat"`` (prompt
                repeated n times) or ``"separate"`` (n calls): identical candidates, for
                measurement.

        Returns:
            One :class:`BestOfNResult` per prompt, in order.

        Example:
            >>> # engine = InferenceScalingEngine(model, ArithmeticTask(digits=3))
            >>> # [r] = engine.best_of_n(["482+917="], n=16, max_new_tokens=5)
            >>> # r.completion, r.correct, r.covered, r.counters.wall_s
        """
        if not _is_int(n) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        strategy = self.strategy if strategy is None else strategy
        self._check_strategy(strategy, "strategy")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(early_exit, bool):
            raise ValueError(f"early_exit must be a bool, got {early_exit!r}")
        if early_exit and mode != "shared":
            raise ValueError("early_exit needs mode='shared'")
        chunk = max(1, n // 4) if early_exit_chunk is None else early_exit_chunk
        if not _is_int(chunk) or chunk < 1:
            raise ValueError(f"early_exit_chunk must be None or an int >= 1, got {chunk!r}")
        if not _is_int(index_offset) or index_offset < 0:
            raise ValueError(f"index_offset must be an int >= 0, got {index_offset!r}")
        texts, ids = self._encode(prompts, max_new_tokens)
        device = self.device
        was_training = self.model.training
        self.model.eval()
        results: list[BestOfNResult | None] = [None] * len(ids)
        try:
            for group in self._groups(ids, n):
                self._run_group(
                    group,
                    texts,
                    ids,
                    n,
                    max_new_tokens,
                    strategy,
                    early_exit,
                    chunk,
                    index_offset,
                    mode,
                    device,
                    results,
                )
        finally:
            self.model.train(was_training)
        return [r for r in results if r is not None]

    def _run_group(
        self,
        group,
        texts,
        ids,
        n,
        max_new_tokens,
        strategy,
        early_exit,
        chunk,
        index_offset,
        mode,
        device,
        results,
    ) -> None:
        stats = DecodeStats()
        batch = torch.tensor([ids[i] for i in group], dtype=torch.long, device=device)
        g_texts = [texts[i] for i in group]
        _sync(device)
        t0 = time.perf_counter()
        rows, solved = self._sample(
            batch,
            g_texts,
            [index_offset + i for i in group],
            n,
            max_new_tokens,
            mode,
            early_exit,
            chunk,
            stats,
        )
        _sync(device)
        sample_s = (time.perf_counter() - t0) / len(group)
        per_prompt: list[list[RowResult]] = [[] for _ in group]
        for r in rows:
            per_prompt[r.prompt].append(r)
        cands, verify_s = [], []
        for p, i in enumerate(group):
            c, dt = self._candidates(texts[i], per_prompt[p])
            cands.append(c)
            verify_s.append(dt)
        learned_s = 0.0
        if self.learned_verifier is not None:
            t0 = time.perf_counter()
            flat = [(p, c) for p in range(len(group)) for c in cands[p]]
            scores = self.learned_verifier.score(
                [ids[group[p]] for p, _ in flat], [c.token_ids for _, c in flat]
            )
            for (_, c), s in zip(flat, scores, strict=True):
                c.learned_score = float(s)
            _sync(device)
            learned_s = (time.perf_counter() - t0) / len(group)
        share = 1.0 / len(group)
        for p, i in enumerate(group):
            counters = Counters(
                prompt_tokens=len(ids[i]),
                prefill_tokens=round(stats.prefill_tokens * share),
                generated_tokens=sum(r.sampled for r in per_prompt[p]),
                candidates=len(cands[p]),
                early_exit=p in solved and len(cands[p]) < n,
                sample_s=sample_s,
                verify_s=verify_s[p],
                learned_s=learned_s,
            )
            choices = self._choices(cands[p])
            k = choices[strategy]
            results[i] = BestOfNResult(
                prompt=texts[i],
                completion=cands[p][k].completion,
                index=k,
                strategy=strategy,
                candidates=cands[p],
                choices=choices,
                counters=counters,
            )
