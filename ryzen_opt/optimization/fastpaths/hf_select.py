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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ryzen_opt.kernels.reference import error_floor, relative_error
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


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def path_names(config, device: torch.device) -> list[str]:
    """The decoder paths to try: ``config.fast_paths`` if given, else the defaults."""
    names = decoder.DEFAULT_PATHS if config.fast_paths is None else config.fast_paths
    return [n for n in names if n in decoder.DECODER_PATHS]


def prompts(model: nn.Module, layout: DecoderLayout, example, config) -> list[tuple[int, dict]]:
    """``(batch, generate kwargs)`` per batch size to measure."""
    dev = layout.device
    if example is not None and isinstance(example.get("input_ids"), torch.Tensor):
        ids = example["input_ids"]
        mask = example.get("attention_mask")
        batches = sorted({ids.shape[0], *config.decode_batches})
    else:
        p = min(config.prefill_shape[1], 64)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, layout.vocab, (1, p), generator=g).to(dev)
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


def _fast(model, layout, name: str, b: int, shared: dict) -> FastGenerate:
    """A generate routed to path ``name`` at batch ``b`` (``shared``: its reusable state)."""
    fast = FastGenerate(model, [(b, b, name)])
    fast._layout, fast.shared = layout, shared
    return fast


def _rel(out: torch.Tensor, ref: torch.Tensor, layout: DecoderLayout, tol: float) -> float:
    dtype = torch.float32 if layout.dtype == torch.float32 else layout.dtype
    return relative_error(out, ref, error_floor(dtype, tol, out.numel(), layout.hidden, 1.0))


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
    """Teacher-forced logits of path ``name`` against the original's; then its own greedy."""
    ids = kw["input_ids"]
    p = ids.shape[1]
    fast = _fast(model, layout, name, b, shared)
    st = fast.stepper(b, p + n)
    with torch.no_grad():
        past, start = _prefill(model, fast, kw)
        st.load(past, p, start)
        del past
        steps = [st.step(ref_tokens[:, j], p + j) for j in range(n - 1)]
    got = torch.stack(steps, 1).float()
    want = ref_logits[:, 1:].float()
    if not torch.isfinite(got).all():
        res.status, res.detail = "error", "non-finite logits"
        return False
    if exact is None:  # float32: the model's own logits are the reference
        err = _rel(got, want, layout, tol)
        res.rel_error = err
        res.max_abs_error = float((got - want).abs().max()) if got.numel() else 0.0
        if err > tol:
            res.status, res.detail = "error", f"relative error {err:.2e} > {tol:g}"
            return False
        note = ""
    else:
        # bf16/fp16: both the model and the path round at every op; each is measured against
        # the same steps in float32 over the same weights. The path passes within the dtype
        # tolerance, or when no further from that answer than the model itself (+25%).
        err, orig = _rel(got, exact, layout, tol), _rel(want, exact, layout, tol)
        res.rel_error = err
        res.max_abs_error = float((got - exact).abs().max()) if got.numel() else 0.0
        note = f"error vs float32 {err:.2e}, the model's own {orig:.2e}; "
        if err > tol and err > ORIGINAL_MARGIN * orig:
            res.status = "error"
            res.detail = note + f"> {tol:g} and > {ORIGINAL_MARGIN:g}x the model's"
            return False
    with torch.no_grad():
        mine = fast(**kw, **_greedy_kwargs(model, n))
    equal = int((mine[:, p:] == ref_tokens).sum())
    res.detail = note + f"greedy tokens equal to the original: {equal}/{ref_tokens.numel()}"
    fast.steppers.clear()
    return True


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
) -> tuple[SiteReport, list, dict]:
    """Verify and time every decoder path at every batch size; the report, the routes and the
    state the paths built (a Numba decoder, int8 weights) for :func:`generate.install`."""
    dev = layout.device
    n = max(2, int(getattr(config, "decode_tokens", 16)))
    srep = SiteReport(
        "(whole model)",
        "generate",
        f"{layout.family}-family decode loop: {n} greedy tokens after the prompt",
    )
    names = path_names(config, dev)
    tol = config.tolerance_for(layout.dtype, dev)
    winners: dict[int, str] = {}
    shared: dict = {}  # state the paths reuse across batch sizes (and the installed generate)
    measured: list[int] = []
    orig = type(model).generate.__get__(model)
    for b, kw in prompts(model, layout, example, config):
        if budget_left() <= 0:
            srep.note = f"time budget spent before batch {b}"
            break
        p = kw["input_ids"].shape[1]
        crep = CaseResult(f"decode b{b}", f"{b}x{p}+{n}")
        gk = _greedy_kwargs(model, n)
        if p + n > layout.max_positions:
            srep.note = f"batch {b}: prompt + {n} tokens exceed the context"
            continue
        with torch.no_grad():
            ref = orig(**kw, **gk, return_dict_in_generate=True, output_logits=True)
        ref_tokens = ref.sequences[:, p:]
        ref_logits = torch.stack(ref.logits, 1)
        del ref
        exact = None
        if layout.dtype != torch.float32:
            exact = exact_logits(model, layout, kw, n, ref_tokens)
        measured.append(b)
        for name in names:
            res = CandidateResult(name, OP, "unsupported")
            crep.candidates.append(res)
            reason = decoder.why_not(name, layout)
            if reason is not None:
                res.detail = reason
                continue
            if budget_left() <= 0:
                res.detail = "not measured: the time budget was spent"
                continue
            try:
                ok = _verify(
                    model,
                    layout,
                    name,
                    b,
                    kw,
                    n,
                    ref_tokens,
                    ref_logits,
                    config.lossy_tolerance if name in decoder.OPT_IN_PATHS else tol,
                    res,
                    shared,
                    exact,
                )
                if ok and name in decoder.OPT_IN_PATHS:
                    res.detail = (
                        f"lossy ({getattr(decoder.PATHS[name], 'weights', 'narrow')} weights):"
                        f" relative logit error {res.rel_error:.2e}"
                        f" within lossy_tolerance={config.lossy_tolerance:g}; " + res.detail
                    )
            except Exception as e:  # a path that raises is reported, never shipped
                res.status, res.detail = "failed", f"{type(e).__name__}: {e}"
                continue
            if not ok:
                continue
            _time(
                model,
                layout,
                name,
                b,
                kw,
                gk,
                orig,
                res,
                config,
                cache,
                dev_desc,
                vers,
                baseline_id,
                shared,
            )
        srep.cases.append(crep)
        best = max(
            (c for c in crep.candidates if c.status == "faster"),
            key=lambda c: c.speedup,
            default=None,
        )
        if best is not None:
            winners[b] = best.backend
            srep.chosen[crep.case] = best.backend
        del ref_tokens, ref_logits, exact
    return srep, batch_ranges(measured, winners), shared


def _time(
    model, layout, name, b, kw, gk, orig, res, config, cache, dev_desc, vers, baseline_id, shared
) -> None:
    p = kw["input_ids"].shape[1]
    key = DecisionCache.key(
        device=dev_desc,
        versions=vers,
        op=OP,
        candidate=name,
        baseline=baseline_id,
        shape=f"{b}x{p}+{gk['max_new_tokens']}",
        repeat=config.repeat,
        min_sample_s=config.min_sample_s,
        confidence=config.confidence,
    )
    hit = cache.get(key)
    if hit is None:
        fast = _fast(model, layout, name, b, shared)
        with torch.no_grad():
            # A generate() call lasts 0.1-3 s where a kernel call lasts microseconds: a quarter
            # of the kernel sample count (>= 5 a side) keeps a 0.5B model's selection near a
            # minute on 2 cores; too few samples can only reject a path, never ship one.
            cmp = compare(
                lambda: orig(**kw, **gk),
                lambda: fast(**kw, **gk),
                repeat=max(5, config.repeat // 4),
                warmup=1,  # the check above already ran both (JIT, graphs, allocator)
                device=layout.device,
                min_sample_s=config.min_sample_s,
                confidence=config.confidence,
            )
        fast.steppers.clear()
        hit = DecisionCache.record(cmp)
        cache.put(key, hit)
    else:
        res.cached = True
    if not res.record_timing(hit, config.min_speedup):
        res.detail += "; " + res.slower_detail(config.min_speedup)
