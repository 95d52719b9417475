"""Choosing a decode path for a Hugging Face decoder by measuring what the user will run.

For every batch size ``optimize()`` covers (the example's and ``decode_batches``), on one
prompt (the example's ids, its rows repeated to the batch, or random ids):

1. **verify**: the original ``generate`` runs greedily for ``decode_tokens`` tokens and keeps
   its logits; each path is prefilled by the model's own forward and then *teacher-forced*
   along the original's tokens, and every step's logits must match the original's within the
   dtype tolerance (so the cache writes and every position are checked, not one step). In
   bf16/fp16 both the model and a path round at every op, differently; there both are
   measured against the same steps computed in float32 over the same weights, and the path
   passes within the tolerance or when no further from that answer than the model itself
   (``ORIGINAL_MARGIN``). The path's own greedy ``generate`` is then compared token for
   token and the count of equal tokens is reported;
2. **time**: the user's call, ``generate(ids, attention_mask=..., max_new_tokens=...,
   do_sample=False)`` through the original and through the path, interleaved, prefill
   included;
3. **choose**: per batch size the fastest path that is faster beyond the noise; a batch
   between two measured ones runs the lower one's winner when both have one, no batch
   outside the measured range is routed (it runs the original ``generate``).

Cost: the logits are compared step by step (a batch-16 step of a 152k-token vocabulary is
10 MB of logits, 20 MB in float64; stacking 8 steps and comparing in float64 took 0.6 GB).
Under a time budget the fused paths are measured first (:data:`PREFERENCE`), the original
runs at a batch size only when the first path gets there, and a path (or a batch size) is
skipped when its estimated cost (:func:`path_cost_s`, from the original's own ``generate``
time) exceeds what is left; before a checked path is turned away, one warm call of each side
replaces the check's own time in the estimate (the check holds one-off work: a cold JIT
cache's compiles, graph captures), and those calls then serve as the comparison's warm-up.
What a rejected path built for itself (a Numba decoder, int8 weights) is dropped, not
installed with the winners.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ryzen_opt.kernels.reference import error_floor
from ryzen_opt.optimization.cache import DecisionCache
from ryzen_opt.optimization.fastpaths import decoder
from ryzen_opt.optimization.fastpaths.decoder_layout import DecoderLayout, reference_step
from ryzen_opt.optimization.fastpaths.generate import FastGenerate
from ryzen_opt.optimization.fastpaths.routing import batch_ranges
from ryzen_opt.optimization.report import CandidateResult, CaseResult, SiteReport
from ryzen_opt.timing import compare

OP = "generate"
# A bf16/fp16 path may be this much further from the float32 answer than the model itself.
ORIGINAL_MARGIN = 1.25
# The order paths are measured in when the config names none: whole-step fused paths first,
# so that a time budget too short for all of them is spent on the likeliest winners.
PREFERENCE = (
    "numba_decoder[fp32]",
    "triton_graph_decode",
    "cuda_graph_decode",
    "torch_static_decode",
)
# The longest synthetic prompt (no example): the decode loop, not the prefill, is chosen.
MAX_PROMPT = 64


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def path_names(config, device: torch.device) -> list[str]:
    """The decoder paths to try: ``config.fast_paths`` if given (in its order), else the
    defaults in :data:`PREFERENCE` order."""
    if config.fast_paths is not None:
        return [n for n in config.fast_paths if n in decoder.DECODER_PATHS]
    rank = {n: i for i, n in enumerate(PREFERENCE)}
    return sorted(decoder.DEFAULT_PATHS, key=lambda n: rank.get(n, len(rank)))


def prompts(
    model: nn.Module, layout: DecoderLayout, example, config, prompt_len: int = MAX_PROMPT
) -> list[tuple[int, dict]]:
    """``(batch, generate kwargs)`` per batch size to measure; without an example, a random
    prompt of ``min(prompt_len, MAX_PROMPT)`` tokens (``prompt_len``: the synthetic
    prefill's length, sized to the model), short enough for the checked and timed tokens
    (:func:`timed_tokens`) to fit in the model's context, and free of the pad token.

    ``generate`` reads a pad token in a prompt given without an attention mask as padding
    (it infers the mask); the paths' checks prefill with an explicit mask, so a random
    prompt that drew the pad id (1 in 5 for a 97-word test vocabulary and 16 tokens) failed
    every path as "error"; so did a model without a pad token (GPT-2, Llama), whose calls
    here pass ``pad_token_id=0``, when a random prompt drew id 0. An example without a mask
    gets the mask ``generate`` infers."""
    dev = layout.device
    # The pad id the checked and timed calls pass (_greedy_kwargs: 0 when the model has none).
    pad = _greedy_kwargs(model, 1)["pad_token_id"]
    pad = pad if isinstance(pad, int) and 0 <= pad < layout.vocab else None
    if example is not None and isinstance(example.get("input_ids"), torch.Tensor):
        ids = example["input_ids"]
        mask = example.get("attention_mask")
        if mask is None and pad is not None and bool((ids == pad).any()):
            eos = model.generation_config.eos_token_id
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            if pad not in eos:
                mask = (ids != pad).long()
        batches = sorted({ids.shape[0], *config.decode_batches})
    else:
        tokens = max(int(getattr(config, "decode_tokens", 16)), timed_tokens(config, dev))
        room = layout.max_positions - tokens
        p = max(1, min(prompt_len, MAX_PROMPT, room))
        g = torch.Generator().manual_seed(0)
        if pad is None or layout.vocab < 2:
            ids = torch.randint(0, layout.vocab, (1, p), generator=g)
        else:  # every id but the pad id
            ids = torch.randint(0, layout.vocab - 1, (1, p), generator=g)
            ids += (ids >= pad).long()
        ids = ids.to(dev)
        mask = None
        batches = sorted(config.decode_batches)
    out = []
    for b in batches:
        reps = -(-b // ids.shape[0])
        kw = {"input_ids": ids.repeat(reps, 1)[:b].to(dev)}
        if mask is not None:
            kw["attention_mask"] = mask.repeat(reps, 1)[:b].to(dev)
        out.append((b, kw))
    return out


def _greedy_kwargs(model, n: int) -> dict[str, Any]:
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = 0
    # No eos: both sides generate exactly n tokens (the same work), whatever the weights.
    return {"max_new_tokens": n, "do_sample": False, "pad_token_id": pad, "eos_token_id": None}


def _fast(model, layout, name: str, b: int, shared: dict, length: int) -> FastGenerate:
    """A generate routed to path ``name`` at batch ``b`` (``shared``: its reusable state),
    its stepper's static cache ``length`` slots: the installed generate rounds a cache up to
    256 or more slots for reuse, and GPT-2 small's 12 KV heads at batch 16 made that 302 MB
    for a 72-token measurement (85 MB at its length)."""
    fast = FastGenerate(model, [(b, b, name)])
    fast._layout, fast.shared = layout, shared
    fast.steppers[b] = decoder.PATHS[name](layout, b, length, shared)
    return fast


class StepError:
    """:func:`~ryzen_opt.kernels.reference.relative_error` of the stacked steps (the same
    floor and non-finite rules), accumulated one step at a time so that no stack of logits is
    ever held; and the largest absolute difference."""

    def __init__(self, layout: DecoderLayout, tol: float) -> None:
        self.layout, self.tol = layout, tol
        self.num2 = self.den2 = self.max_abs = 0.0
        self.numel = 0
        self.bad = False

    def add(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        if out.shape != ref.shape:
            raise ValueError(f"out shape {tuple(out.shape)} != ref shape {tuple(ref.shape)}")
        o, r = out.detach().double(), ref.detach().double()
        same = (o == r) | (torch.isnan(o) & torch.isnan(r))
        if not bool(same[~(torch.isfinite(o) & torch.isfinite(r))].all()):
            self.bad = True
        finite = torch.isfinite(r)
        self.num2 += float(torch.where(finite, o - r, 0.0).square().sum())
        self.den2 += float(torch.where(finite, r, 0.0).square().sum())
        if o.numel():
            self.max_abs = max(self.max_abs, float(torch.nan_to_num(o - r).abs().max()))
        self.numel += o.numel()

    @property
    def value(self) -> float:
        if self.bad:
            return math.inf
        dtype = torch.float32 if self.layout.dtype == torch.float32 else self.layout.dtype
        floor = error_floor(dtype, self.tol, self.numel, self.layout.hidden, 1.0)
        num, den = math.sqrt(self.num2), max(math.sqrt(self.den2), floor)
        if num == 0.0:
            return 0.0
        return num / den if den > 0 else math.inf


def _prefill(model, fast: FastGenerate, kw: dict):
    """The model's own prefill as ``generate`` runs it: ``(past_key_values, start)``."""
    ids = kw["input_ids"]
    mask = kw.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **fast._keep()
    )
    return out.past_key_values, ids.shape[1] - mask.sum(-1)


@torch.no_grad()
def exact_logits(model, layout: DecoderLayout, kw: dict, n: int, ref_tokens) -> torch.Tensor:
    """The decode steps of the original's greedy run, teacher-forced, in float32 math over
    the model's own (bf16/fp16) weights and prefill cache: ``(batch, n - 1, vocab)``."""
    ids = kw["input_ids"]
    b, p = ids.shape
    fast = FastGenerate(model, [])
    fast._layout = layout
    past, start = _prefill(model, fast, kw)
    shape = (layout.num_layers, b, layout.kv_heads, p + n, layout.head_dim)
    kc = torch.zeros(shape, device=layout.device, dtype=torch.float32)
    vc = torch.zeros_like(kc)
    decoder.load_cache(kc, vc, past, p)
    del past
    steps = []
    for j in range(n - 1):
        t = torch.tensor([p + j], device=layout.device)
        steps.append(reference_step(layout, ref_tokens[:, j], kc, vc, t, start).float())
    return torch.stack(steps, 1)


def _verify(
    model, layout, name, b, kw, n, ref_tokens, ref_logits, tol, res, shared, exact=None
) -> bool:
    """Teacher-forced logits of path ``name`` against the original's; then its own greedy.
    ``ref_logits``: the original's logits per step (``n`` of ``(batch, vocab)``); ``exact``:
    for bf16/fp16, :func:`exact_logits`. Compared step by step (:class:`StepError`)."""
    ids = kw["input_ids"]
    p = ids.shape[1]
    fast = _fast(model, layout, name, b, shared, p + n)
    st = fast.stepper(b, p + n)
    err, orig = StepError(layout, tol), StepError(layout, tol)
    finite = True
    with torch.no_grad():
        past, start = _prefill(model, fast, kw)
        st.load(past, p, start)
        del past
        for j in range(n - 1):
            got = st.step(ref_tokens[:, j], p + j).float()
            finite = finite and bool(torch.isfinite(got).all())
            want = ref_logits[j + 1].float()
            if exact is None:  # float32: the model's own logits are the reference
                err.add(got, want)
            else:
                err.add(got, exact[:, j])
                orig.add(want, exact[:, j])
            del got
    if not finite:
        res.status, res.detail = "error", "non-finite logits"
        return False
    res.rel_error, res.max_abs_error = err.value, err.max_abs
    if exact is None:
        if res.rel_error > tol:
            res.status, res.detail = "error", f"relative error {res.rel_error:.2e} > {tol:g}"
            return False
        note = ""
    else:
        # bf16/fp16: both the model and the path round at every op; each is measured against
        # the same steps in float32 over the same weights. The path passes within the dtype
        # tolerance, or when no further from that answer than the model itself (+25%).
        e, o = res.rel_error, orig.value
        note = f"error vs float32 {e:.2e}, the model's own {o:.2e}; "
        if e > tol and e > ORIGINAL_MARGIN * o:
            res.status = "error"
            res.detail = note + f"> {tol:g} and > {ORIGINAL_MARGIN:g}x the model's"
            return False
    with torch.no_grad():
        mine = fast(**kw, **_greedy_kwargs(model, n))
    equal = int((mine[:, p:] == ref_tokens).sum())
    res.detail = note + f"greedy tokens equal to the original: {equal}/{ref_tokens.numel()}"
    fast.steppers.clear()
    return True


def timing_repeat(config) -> int:
    """Samples a side in a ``generate`` comparison: a call lasts 0.1-3 s where a kernel call
    lasts microseconds, so a quarter of the kernel sample count (>= 5 a side)."""
    return max(5, config.repeat // 4)


def timing_cost_s(config, ref_s: float, path_s: float, warm: bool = False) -> float:
    """The expected seconds of one ``generate`` comparison: a warm-up and a calibration call
    (none when ``warm``: both sides were just timed warm) and :func:`timing_repeat` samples a
    side, the original's calls ``ref_s`` each, the path's ``path_s``."""
    return ((0 if warm else 2) + timing_repeat(config)) * (ref_s + path_s)


def path_cost_s(config, ref_s: float, cached: bool, scale: float = 1.0) -> float:
    """The expected seconds of one path at one batch size, from ``ref_s`` (the original's
    own ``generate`` of the checked tokens), counting the path as slow as the original: its
    check (a teacher-forced pass and its own ``generate``), and unless ``cached``, the
    comparison (:func:`timing_cost_s`) of calls ``scale`` times as long (timed tokens over
    checked tokens)."""
    check = 2 * ref_s
    return check if cached else check + timing_cost_s(config, ref_s * scale, ref_s * scale)


def timed_tokens(config, device: torch.device) -> int:
    """Greedy tokens of each timed ``generate`` call (``OptimizeConfig.decode_timed_tokens``:
    ``None`` is ``decode_tokens`` on a CPU and twice that on a GPU)."""
    n = max(2, int(getattr(config, "decode_tokens", 16)))
    t = getattr(config, "decode_timed_tokens", None)
    if t is not None:
        return int(t)
    return 2 * n if device.type == "cuda" else n


@dataclass
class _Batch:
    """One batch size being measured: its prompt, the original's run and the results."""

    b: int
    kw: dict
    crep: CaseResult
    ref_s: float  # the original's generate (with logits) took this long
    ref_tokens: torch.Tensor
    ref_logits: list
    exact: torch.Tensor | None
    warm: bool = False  # ref_s is from a second (warm) call
    timed: dict | None = None  # the timed generate's keywords (None: the checked call's)

    def warm_ref(self, orig, gk: dict, dev: torch.device, cost, left) -> float:
        """``cost(ref_s)``: what a step estimated from this batch's ``ref_s`` needs. The
        first call (with logits) can be several times a warm one: when the estimate does not
        fit in ``left()`` but one call does, ``ref_s`` becomes a warm call's time (once).
        Returns the estimate."""
        need = cost(self.ref_s)
        if not self.warm and need > left() > self.ref_s:
            self.ref_s = min(self.ref_s, _call_s(lambda: orig(**self.kw, **gk), dev))
            self.warm = True
            need = cost(self.ref_s)
        return need


def select(
    model: nn.Module,
    layout: DecoderLayout,
    example,
    config,
    cache: DecisionCache,
    dev_desc: str,
    vers: dict,
    baseline_id: str,
    budget_left,
    prompt_len: int = MAX_PROMPT,
    progress=None,
) -> tuple[SiteReport, list, dict]:
    """Verify and time every decoder path at every batch size; the report, the routes and the
    state the paths built (a Numba decoder, int8 weights) for :func:`generate.install`.

    Each path in turn (:func:`path_names` order) at every batch size, so that a time budget
    too short for every path is spent on the likeliest winners at each batch size. The
    original runs at a batch size when the first path gets there, not all up front: on a
    2-core CPU Qwen2-0.5B's batch-16 run took the time the first path needed at batch 1.
    ``budget_left()``: seconds left of the budget. A batch size is not measured, nor any
    larger one, when what is left would not cover one path's check and timing
    (:func:`path_cost_s` from a smaller batch's original run, a lower bound; the check alone
    when a path's decision is cached); a path whose estimated check and timing would not fit
    is turned away. The report says what was needed.
    ``progress(what)``: called as each (path, batch size) step starts (:func:`steps`)."""
    dev = layout.device
    n = max(2, int(getattr(config, "decode_tokens", 16)))
    nt = timed_tokens(config, dev)
    srep = SiteReport(
        "(whole model)",
        "generate",
        f"{layout.family}-family decode loop: {n} greedy tokens after the prompt checked"
        + (f", {nt} timed" if nt != n else ", and timed"),
    )
    names = path_names(config, dev)
    tol = config.tolerance_for(layout.dtype, dev)
    winners: dict[int, str] = {}
    shared: dict = {}  # state the paths reuse across batch sizes (and the installed generate)
    owned: dict[str, set] = {name: set() for name in names}  # what each path put in shared
    orig = type(model).generate.__get__(model)
    gk = _greedy_kwargs(model, n)
    tick = progress if progress is not None else (lambda what: None)
    todo = prompts(model, layout, example, config, prompt_len)
    runs: dict[int, _Batch | None] = {}  # prompt index -> the original's run (None: skipped)
    cut = [len(todo)]  # prompts from this index on are not measured (the budget)

    def original(i: int) -> _Batch | None:
        if i in runs:
            return runs[i]
        b, kw = todo[i]
        runs[i] = None
        p = kw["input_ids"].shape[1]
        nt_b = max(n, min(nt, layout.max_positions - p))  # the timed call fits the context
        # The least one path needs after this run (a smaller batch's run as a lower bound of
        # this one's): its check, and unless a path's decision is cached, its timing. On a
        # 2-core CPU Qwen2-0.5B's batch-16 original ran for ~12 s with 14 s left and no
        # path able to fit after it.
        shape = n if nt_b == n else f"{n}/{nt_b}"
        cached = any(
            decoder.why_not(name, layout) is None
            and cache.get(_key(name, b, p, shape, config, dev_desc, vers, baseline_id)) is not None
            for name in names
        )
        done = [r for r in runs.values() if r is not None]
        low = min(done, key=lambda r: r.ref_s, default=None)
        need = 0.0
        if low is not None:
            need = low.warm_ref(
                orig, gk, dev, lambda r: path_cost_s(config, r, cached, nt_b / n), budget_left
            )
        left = budget_left()
        if left <= 0 or left < need:
            cut[0] = i
            srep.unmeasured.append(f"batch {b} and up")
            srep.note = _join(
                srep.note,
                f"batch {b} and up not measured: "
                + (
                    "the time budget was spent"
                    if left <= 0
                    else f"over {need:.0f} s needed, {left:.0f} s of the time budget left"
                ),
            )
            return None
        if p + n > layout.max_positions:
            srep.note = _join(srep.note, f"batch {b}: prompt + {n} tokens exceed the context")
            return None
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = orig(**kw, **gk, return_dict_in_generate=True, output_logits=True)
        _sync(dev)
        ref_s = time.perf_counter() - t0
        ref_tokens = ref.sequences[:, p:]
        exact = None
        if layout.dtype != torch.float32:
            exact = exact_logits(model, layout, kw, n, ref_tokens)
        crep = CaseResult(f"decode b{b}", f"{b}x{p}+{n}")
        timed = _greedy_kwargs(model, nt_b) if nt_b != n else None
        runs[i] = _Batch(b, kw, crep, ref_s, ref_tokens, list(ref.logits), exact, timed=timed)
        return runs[i]

    for name in names:
        for i in range(len(todo)):
            if i >= cut[0]:
                break
            m = original(i)
            if m is None:
                continue
            tick(f"generate b{m.b}: {name}")
            res = _measure(
                model,
                layout,
                name,
                m,
                n,
                gk,
                orig,
                config,
                cache,
                tol,
                shared,
                owned,
                _key(
                    name,
                    m.b,
                    m.kw["input_ids"].shape[1],
                    n if m.timed is None else f"{n}/{m.timed['max_new_tokens']}",
                    config,
                    dev_desc,
                    vers,
                    baseline_id,
                ),
                budget_left,
            )
            m.crep.candidates.append(res)
            if res.status == "unmeasured":
                srep.unmeasured.append(f"{name} at batch {m.b}")
    batches = [runs[i] for i in sorted(runs) if runs[i] is not None]
    for m in batches:
        srep.cases.append(m.crep)
        best = max(
            (c for c in m.crep.candidates if c.status == "faster"),
            key=lambda c: c.speedup,
            default=None,
        )
        if best is not None:
            winners[m.b] = best.backend
            srep.chosen[m.crep.case] = best.backend
    # What a path that won nowhere built (its decoder, its int8 weights) is not installed.
    keep = set().union(*(owned[w] for w in set(winners.values()))) if winners else set()
    for keys in owned.values():
        for k in keys - keep:
            shared.pop(k, None)
    return srep, batch_ranges([m.b for m in batches], winners), shared


def _join(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


def _measure(
    model, layout, name, m: _Batch, n, gk, orig, config, cache, tol, shared, owned, key, left
) -> CandidateResult:
    """Path ``name`` at batch ``m``: supported? fits the budget? matches? faster?"""
    res = CandidateResult(name, OP, "unsupported")
    reason = decoder.why_not(name, layout)
    if reason is not None:
        res.detail = reason
        return res
    cached = cache.get(key) is not None
    gt = m.timed if m.timed is not None else gk  # the timed call's keywords
    scale = gt["max_new_tokens"] / n
    need = m.warm_ref(
        orig, gk, layout.device, lambda r: path_cost_s(config, r, cached, scale), left
    )
    if _over(res, need, left()):
        return res
    before = set(shared)
    try:
        t0 = time.perf_counter()
        ok = _verify(
            model,
            layout,
            name,
            m.b,
            m.kw,
            n,
            m.ref_tokens,
            m.ref_logits,
            config.lossy_tolerance if name in decoder.OPT_IN_PATHS else tol,
            res,
            shared,
            m.exact,
        )
        verify_s = time.perf_counter() - t0
        if ok and name in decoder.OPT_IN_PATHS:
            res.detail = (
                f"lossy ({getattr(decoder.PATHS[name], 'weights', 'narrow')} weights):"
                f" relative logit error {res.rel_error:.2e}"
                f" within lossy_tolerance={config.lossy_tolerance:g}; " + res.detail
            )
        # The check ran the path's own generate once: the timing's cost is now known better.
        cost = timing_cost_s(config, m.ref_s * scale, verify_s / 2 * scale)
        fast, warm = None, False
        if ok and not cached and cost > left() > verify_s / 2 * scale:
            # The check's time holds one-off work (a cold JIT cache's compiles, graph
            # captures): on a fresh H200 a Llama-1B's triton_graph_decode was estimated at
            # 65 s with 46 s left and turned away. Time one warm call of each side first.
            fast = _fast(
                model, layout, name, m.b, shared, m.kw["input_ids"].shape[1] + gt["max_new_tokens"]
            )
            path_s = _call_s(lambda: fast(**m.kw, **gt), layout.device)
            ref_s = _call_s(lambda: orig(**m.kw, **gt), layout.device)
            # Those calls were the warm-up, and each lasted a sample (inner=1): the
            # comparison needs neither again (on a fresh 2-core machine Qwen2-0.5B's batch 1
            # needed 17 s with them, 12 s without, and had 14 s left).
            warm = min(path_s, ref_s) >= config.min_sample_s
            cost = timing_cost_s(config, ref_s, path_s, warm)
        if ok and not cached and _over(res, cost, left()):
            ok = False
            if fast is not None:
                fast.steppers.clear()
        if ok:
            _time(
                model,
                layout,
                name,
                m.b,
                m.kw,
                gt,
                orig,
                res,
                config,
                cache,
                key,
                shared,
                fast,
                warm,
            )
    except Exception as e:  # a path that raises is reported, never shipped
        res.status, res.detail = "failed", f"{type(e).__name__}: {e}"
    finally:
        owned[name] |= set(shared) - before
    return res


def _over(res: CandidateResult, cost: float, left: float) -> bool:
    """Whether ``cost`` seconds do not fit in ``left``; if so the result says so (status
    ``"unmeasured"``)."""
    if left > 0 and cost <= left:
        return False
    res.status = "unmeasured"
    res.detail = _join(
        res.detail,
        "not measured: the time budget was spent"
        if left <= 0
        else f"not measured: about {cost:.0f} s needed, {left:.0f} s of the time budget left",
    )
    return True


def steps(model, layout: DecoderLayout, example, config, prompt_len: int = MAX_PROMPT) -> int:
    """How many times :func:`select` calls ``progress``: batch sizes x paths."""
    return len(prompts(model, layout, example, config, prompt_len)) * len(
        path_names(config, layout.device)
    )


def _key(name, b, p, n, config, dev_desc, vers, baseline_id) -> str:
    return DecisionCache.key(
        device=dev_desc,
        versions=vers,
        op=OP,
        candidate=name,
        baseline=baseline_id,
        shape=f"{b}x{p}+{n}",
        repeat=config.repeat,
        min_sample_s=config.min_sample_s,
        confidence=config.confidence,
    )


def _call_s(call, dev: torch.device) -> float:
    """The seconds of one call of ``call`` (no gradients, the device synchronized)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        call()
    _sync(dev)
    return time.perf_counter() - t0


def _time(
    model, layout, name, b, kw, gk, orig, res, config, cache, key, shared, fast=None, warm=False
):
    """Time path ``name`` against the original (or take the cached result); ``fast``: the
    path's generate when one was made already; ``warm``: both sides have just run warm, each
    call at least ``config.min_sample_s`` (no warm-up or calibration calls)."""
    hit = cache.get(key)
    if hit is None:
        if fast is None:
            fast = _fast(
                model, layout, name, b, shared, kw["input_ids"].shape[1] + gk["max_new_tokens"]
            )
        with torch.no_grad():
            # Few samples (timing_repeat) keep a 0.5B model's selection near a minute on 2
            # cores; too few samples can only reject a path, never ship one.
            cmp = compare(
                lambda: orig(**kw, **gk),
                lambda: fast(**kw, **gk),
                repeat=timing_repeat(config),
                # the check above already ran both (JIT, graphs, allocator)
                warmup=0 if warm else 1,
                device=layout.device,
                min_sample_s=config.min_sample_s,
                confidence=config.confidence,
                inner=1 if warm else None,
            )
        fast.steppers.clear()
        hit = DecisionCache.record(cmp)
        cache.put(key, hit)
    else:
        res.cached = True
    if not res.record_timing(hit, config.min_speedup):
        res.detail += "; " + res.slower_detail(config.min_speedup)
