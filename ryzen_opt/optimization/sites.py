"""Finding what ``optimize()`` can serve, and capturing the real inputs of every site.

A *run* is one forward pass of the whole model on typical shapes (a prefill, or a one-token
decode step after a cache). Running them with forward pre-hooks records the actual inputs
of every Linear, LayerNorm and attention site; each distinct input shape becomes a
:class:`Case` holding the original computation (``baseline``) and one :class:`Candidate` per
backend variant, both bound to those inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ryzen_opt.kernels import registry
from ryzen_opt.kernels.reference import apply_activation
from ryzen_opt.models.attention import attention_case, qkv_heads, sdpa_core
from ryzen_opt.models.model import MLP, CausalSelfAttention, SimpleTransformerModel
from ryzen_opt.optimization import hf
from ryzen_opt.optimization.modules import (
    FusedLinear,
    FusedMLP,
    OptimizedLayerNorm,
    OptimizedSelfAttention,
    Route,
    attention_args,
    attention_call,
    layer_norm_call,
    linear_args,
    linear_call,
)


@dataclass
class Candidate:
    """One backend variant bound to one case's inputs."""

    name: str
    op: str
    backend: str
    args: tuple
    call: Callable[[], torch.Tensor]
    packed: bool = False


@dataclass
class Case:
    """One measured input shape of a site: the original computation and the candidates."""

    label: str
    shape: str
    key: tuple
    dims: dict[str, int]
    baseline: Callable[[], torch.Tensor]
    candidates: list[Candidate] = field(default_factory=list)


@dataclass
class Site:
    """A place in the model that a backend may serve.

    ``install(model, routes)`` swaps the replacement in and returns a function that undoes it.
    ``route_case`` maps a case label to the label the runtime module routes on (``"any"`` for
    modules that do not know whether they run a prefill or a decode step).
    """

    path: str
    kind: str
    detail: str
    baseline_id: str
    cases: list[Case]
    install: Callable[[nn.Module, list[Route]], Callable[[], None]]
    route_case: Callable[[str], str] = lambda label: label


@dataclass
class Run:
    """One whole-model forward on typical shapes; ``call`` must not change ``state``."""

    label: str
    shape: str
    setup: Callable[[nn.Module], Any]
    call: Callable[[nn.Module, Any], torch.Tensor]


# ----------------------------------------------------------------------------- runs


def _ids(gen: torch.Generator, vocab: int, shape: tuple[int, int], device) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=gen).to(device)


def _decode_prompt_lengths(max_len: int) -> list[int]:
    # Decode is measured after a short and a near-full cache, so a route covers the lengths
    # in between that generation walks through.
    return sorted({p for p in (max(1, max_len // 4), max_len - 1) if p >= 1 and p + 1 <= max_len})


def _rows(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` rows of ``ids``: its first rows, or its rows repeated when it has fewer."""
    reps = -(-batch // ids.shape[0])
    return ids.repeat(reps, 1)[:batch] if reps > 1 else ids[:batch]


def _example_batches(batch: int, config) -> list[int]:
    # The example's own batch and the configured decode batches: a user who optimizes with a
    # 16-row prompt still generates one row at a time, and a swap measured only at 16 rows
    # would run (or pay its routing) unmeasured at one.
    return sorted({batch, *config.decode_batches})


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


def stm_runs(model: SimpleTransformerModel, example, config, device) -> list[Run]:
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    runs: list[Run] = []
    if example is not None:
        prompt = example
        b, t = example.shape
        decode = [(db, t) for db in _example_batches(b, config)] if t + 1 <= cfg.max_seq_len else []
    else:
        b, t = config.prefill_shape[0], min(config.prefill_shape[1], cfg.max_seq_len)
        prompt = _ids(gen, cfg.vocab_size, (b, t), device)
        decode = [
            (db, p) for db in config.decode_batches for p in _decode_prompt_lengths(cfg.max_seq_len)
        ]
    runs.append(Run("prefill", f"{b}x{t}", lambda m, p=prompt: p, lambda m, p: m(p)[0]))
    for db, p in decode:
        ids = (
            _rows(example, db)
            if example is not None
            else _ids(gen, cfg.vocab_size, (db, p + 1), device)
        )

        def setup(m, ids=ids, p=p):
            _, cache = m(ids[:, :p])
            return ids[:, p : p + 1] if ids.shape[1] > p else ids[:, -1:], cache

        runs.append(Run("decode", f"{db}x1 after {p}", setup, lambda m, s: m(s[0], s[1])[0]))
    return runs


def hf_runs(model: nn.Module, example, config, device) -> list[Run]:
    cfg = model.config
    max_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 128)
    gen = torch.Generator().manual_seed(0)
    runs: list[Run] = []
    # generate() asks for the last position's logits only where the model allows it; so do
    # the runs: what is timed is what generation runs, and a 16 x 128 prefill of a
    # 152k-token vocabulary does not materialise 1.2 GB of logits nobody reads.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}
    if example is not None:
        kw = {**keep, **example}  # keyword arguments (optimization/examples.py normalised them)
        ids = kw.get("input_ids")
        runs.append(Run("prefill", _shape_of(kw), lambda m, k=kw: k, lambda m, k: _logits(m(**k))))
        if ids is None or ids.dim() != 2 or ids.shape[1] + 1 > max_len:
            return runs
        decode = []
        for db in _example_batches(ids.shape[0], config):
            rows = {k: _rows(v, db) if _is_rows(v, ids) else v for k, v in kw.items()}
            decode.append((rows, db, ids.shape[1]))
    else:
        b, t = config.prefill_shape[0], min(config.prefill_shape[1], max_len)
        ids = _ids(gen, cfg.vocab_size, (b, t), device)
        # The model's own use_cache default: a prefill that starts generation builds a cache.
        runs.append(
            Run(
                "prefill",
                f"{b}x{t}",
                lambda m, i=ids: i,
                lambda m, i: _logits(m(input_ids=i, **keep)),
            )
        )
        decode = []
        # Decode caches up to the prefill length, not the model's whole context: at
        # max_position_embeddings=4096 and batch 16 the set-up alone needed 40 GB of logits.
        for db in config.decode_batches:
            for p in _decode_prompt_lengths(t):
                kw = {"input_ids": _ids(gen, cfg.vocab_size, (db, p), device), **keep}
                decode.append((kw, db, p))

    for kw, db, p in decode:

        def setup(m, kw=kw):
            out = m(**{**kw, "use_cache": True})
            step = {
                "input_ids": kw["input_ids"][:, -1:],
                "past_key_values": out.past_key_values,
                "use_cache": True,
            }
            if kw.get("attention_mask") is not None:
                mask = kw["attention_mask"]
                step["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            return step

        def call(m, step, p=p):
            out = m(**step)
            # Undo the step's append, so the state stays as set up. A negative crop (remove
            # n tokens) is what transformers 4.x and 5.x both accept without a warning.
            cache = step["past_key_values"]
            extra = cache.get_seq_length() - p
            if extra > 0:
                cache.crop(-extra)
            return _logits(out)

        runs.append(Run("decode", f"{db}x1 after {p}", setup, call))
    return runs


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _is_rows(v: Any, ids: torch.Tensor) -> bool:
    """Whether ``v`` is a per-row tensor of the example (ids, attention mask, positions)."""
    return isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] == ids.shape[0]


def generic_runs(model: nn.Module, example) -> list[Run]:
    if isinstance(example, dict):
        return [Run("example", _shape_of(example), lambda m: example, lambda m, k: _logits(m(**k)))]
    args = example if isinstance(example, tuple) else (example,)
    return [Run("example", _shape_of(args), lambda m: args, lambda m, a: _logits(m(*a)))]


def _shape_of(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return "x".join(map(str, obj.shape))
    if isinstance(obj, dict):
        return ", ".join(
            f"{k}={_shape_of(v)}" for k, v in obj.items() if isinstance(v, torch.Tensor)
        )
    if isinstance(obj, (tuple, list)):
        return ", ".join(_shape_of(v) for v in obj if isinstance(v, torch.Tensor))
    return type(obj).__name__


# ----------------------------------------------------------------------------- capture


def capture(model: nn.Module, runs: list[Run], targets: dict[str, nn.Module], hf_on: bool):
    """Run ``runs``; return ``{path: [(label, args)]}`` and the HF attention call records."""
    seen: dict[str, list[tuple[str, tuple]]] = {p: [] for p in targets}
    state = {"label": None}
    handles = []
    for path, mod in targets.items():

        def hook(m, args, path=path):
            if state["label"] is not None:
                seen[path].append((state["label"], args))

        handles.append(mod.register_forward_pre_hook(hook))
    rec = hf.capture() if hf_on else None
    try:
        with torch.no_grad():
            for run in runs:
                s = run.setup(model)
                state["label"] = run.label
                hf.set_label(run.label)
                if rec is not None:
                    with rec:
                        run.call(model, s)
                else:
                    run.call(model, s)
                state["label"] = None
    finally:
        for h in handles:
            h.remove()
    return seen, (rec.records if rec is not None else [])


# ----------------------------------------------------------------------------- sites


def _allowed(op: str, allowed: tuple[str, ...] | None) -> list[str]:
    return [n for n in registry.backends(op) if allowed is None or n in allowed]


def _launcher(op: str, name: str):
    return registry.backends(op)[name].launcher


def _replace(model: nn.Module, path: str, new: nn.Module) -> Callable[[], None]:
    old = model.get_submodule(path)
    model.set_submodule(path, new)
    return lambda: model.set_submodule(path, old)


def _dedupe(items, key):
    out, keys = [], set()
    for it in items:
        k = key(it)
        if k not in keys:
            keys.add(k)
            out.append(it)
    return out


def linear_site(model, path, mod: nn.Linear, captured, allowed, activation=None) -> Site:
    w = mod.weight.detach()
    b = None if mod.bias is None else mod.bias.detach()
    w_t, w_packed = w.t(), w.t().contiguous()
    cases = []
    for label, args in _dedupe(captured, lambda c: (c[0], tuple(c[1][0].shape))):
        x = args[0]
        shape = "x".join(map(str, x.shape))
        case = Case(
            label,
            shape,
            ("linear", tuple(x.shape), tuple(w.shape), b is not None, activation, str(x.dtype)),
            {"rows": x.numel() // mod.in_features},
            lambda x=x: apply_activation(mod(x), activation),
        )
        for name in _allowed("matmul", allowed):
            fn = _launcher("matmul", name)
            for wt, packed in ((w_t, False), (w_packed, True)):
                case.candidates.append(
                    Candidate(
                        f"{name}[packed]" if packed else name,
                        "matmul",
                        name,
                        linear_args(x, wt, b, activation),
                        lambda fn=fn, x=x, wt=wt: linear_call(fn, x, wt, b, activation),
                        packed,
                    )
                )
        cases.append(case)

    if activation is None:

        def install(m, routes):
            return _replace(m, path, FusedLinear(m.get_submodule(path), routes))
    else:
        parent = path.rsplit(".", 1)[0]

        def install(m, routes):
            mlp = m.get_submodule(parent)
            fused = FusedLinear(mlp.fc1, routes, activation)
            return _replace(m, parent, FusedMLP(fused, mlp.fc2))

    detail = f"Linear {mod.in_features}->{mod.out_features}" + (
        f" +{activation}" if activation else ""
    )
    return Site(path, "linear", detail, _qualname(mod), cases, install, lambda label: "any")


def layer_norm_site(model, path, mod: nn.LayerNorm, captured, allowed) -> Site:
    w = None if mod.weight is None else mod.weight.detach()
    b = None if mod.bias is None else mod.bias.detach()
    cases = []
    for label, args in _dedupe(captured, lambda c: (c[0], tuple(c[1][0].shape))):
        x = args[0]
        case = Case(
            label,
            "x".join(map(str, x.shape)),
            ("layer_norm", tuple(x.shape), w is not None, b is not None, str(x.dtype)),
            {"rows": x.numel() // max(x.shape[-1], 1)},
            lambda x=x: mod(x),
        )
        for name in _allowed("layer_norm", allowed):
            fn = _launcher("layer_norm", name)
            case.candidates.append(
                Candidate(
                    name,
                    "layer_norm",
                    name,
                    (x, w, b, mod.eps, None),
                    lambda fn=fn, x=x: layer_norm_call(fn, x, w, b, mod.eps),
                )
            )
        cases.append(case)

    def install(m, routes):
        return _replace(m, path, OptimizedLayerNorm(m.get_submodule(path), routes))

    return Site(
        path,
        "layer_norm",
        f"LayerNorm {tuple(mod.normalized_shape)}",
        _qualname(mod),
        cases,
        install,
        lambda label: "any",
    )


def _attention_candidates(case: Case, allowed, q, k, v, causal, scale, mask, call_for) -> None:
    ops = ["attention"] + (["decode_attention"] if q.shape[2] == 1 and mask is None else [])
    for op in ops:
        for name in _allowed(op, allowed):
            fn = _launcher(op, name)
            label = name if op == "attention" else f"{name}[decode]"
            case.candidates.append(
                Candidate(
                    label,
                    op,
                    name,
                    attention_args(op, q, k, v, causal, scale, mask),
                    call_for(op, fn),
                )
            )


def stm_attention_site(model, path, mod: CausalSelfAttention, captured, allowed) -> Site | None:
    cases = []
    with torch.no_grad():
        for _label, args in captured:
            x, past = args[0], (args[1] if len(args) > 1 else None)
            kind = attention_case(x.shape[1], 0 if past is None else past[0].shape[2])
            if kind is None:
                continue
            q, k, v = qkv_heads(mod, x, past)
            shape = f"q{tuple(q.shape)} k{tuple(k.shape)}"
            key = ("stm_attention", kind, tuple(q.shape), tuple(k.shape), str(q.dtype))
            if any(c.key == key for c in cases):
                continue
            causal = kind == "prefill" and q.shape[2] > 1
            case = Case(
                kind,
                shape,
                key,
                {"batch": q.shape[0], "kv_len": k.shape[2]},
                lambda q=q, k=k, v=v: sdpa_core(q, k, v),
            )

            def call_for(op, fn, q=q, k=k, v=v, causal=causal):
                return lambda: attention_call(op, fn, q, k, v, causal)

            _attention_candidates(case, allowed, q, k, v, causal, None, None, call_for)
            cases.append(case)

    def install(m, routes):
        return _replace(m, path, OptimizedSelfAttention(m.get_submodule(path), routes))

    return Site(
        path, "attention", f"causal self-attention, {mod.num_heads} heads", "sdpa", cases, install
    )


def hf_attention_sites(model, records, allowed) -> list[Site]:
    by_module: dict[int, list[dict]] = {}
    for r in records:
        by_module.setdefault(id(r["module"]), []).append(r)
    names = {id(m): n for n, m in model.named_modules()}
    return [
        _hf_site(names.get(mid, type(recs[0]["module"]).__name__), recs, allowed)
        for mid, recs in by_module.items()
    ]


def _hf_site(path: str, recs: list[dict], allowed) -> Site:
    module = recs[0]["module"]
    impl = recs[0]["impl"]
    orig = hf.original_function(module, impl)
    cases: list[Case] = []
    for r in recs:
        q, k, v, mask = r["args"]
        kw = r["kwargs"]
        kind = hf.hf_case(q.shape[2], k.shape[2])
        if kind is None:
            continue
        mshape = None if mask is None else (tuple(mask.shape), str(mask.dtype))
        key = (
            "hf_attention",
            impl,
            kind,
            tuple(q.shape),
            tuple(k.shape),
            mshape,
            kw.get("scaling"),
            str(q.dtype),
        )
        if any(c.key == key for c in cases):
            continue
        shape = f"q{tuple(q.shape)} k{tuple(k.shape)}" + (" +mask" if mshape else "")
        case = Case(
            kind,
            shape,
            key,
            hf.hf_dims(q, k, mask),
            lambda q=q, k=k, v=v, mask=mask, kw=kw: orig(module, q, k, v, mask, **kw)[0],
        )
        m2, causal, scale = hf.hf_mask_causal_scale(module, q, k, mask, kw)

        def call_for(op, fn, q=q, k=k, v=v, mask=mask, kw=kw):
            return lambda: hf.hf_kernel_call(op, fn, module, q, k, v, mask, kw)

        _attention_candidates(case, allowed, q, k, v, causal, scale, m2, call_for)
        cases.append(case)

    def install(m, routes):
        hf.install(module, routes)
        return lambda: delattr(module, hf.ROUTES_ATTR)

    return Site(
        path,
        "attention",
        f"{type(module).__name__} via AttentionInterface ({impl})",
        f"hf:{impl}",
        cases,
        install,
    )


def _qualname(mod: nn.Module) -> str:
    return f"{type(mod).__module__}.{type(mod).__qualname__}"


def find_targets(model: nn.Module, ops: tuple[str, ...]) -> dict[str, tuple[str, nn.Module]]:
    """``{path: (kind, module)}`` for every module ``optimize()`` can serve."""
    out: dict[str, tuple[str, nn.Module]] = {}
    for path, mod in model.named_modules():
        if isinstance(mod, (FusedLinear, OptimizedLayerNorm, OptimizedSelfAttention)):
            continue
        if "linear" in ops and isinstance(mod, nn.Linear) and path:
            out[path] = ("linear", mod)
        elif (
            "layer_norm" in ops and isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1
        ):
            out[path] = ("layer_norm", mod)
        elif "attention" in ops and type(mod) is CausalSelfAttention:
            out[path] = ("attention", mod)
    return out


def fused_activation(model: nn.Module, path: str) -> str | None:
    """``"gelu"`` for the baseline MLP's fc1 (its forward is exactly fc2(gelu(fc1(x))))."""
    if "." not in path or not path.endswith(".fc1"):
        return None
    parent = model.get_submodule(path.rsplit(".", 1)[0])
    return "gelu" if type(parent) is MLP else None
