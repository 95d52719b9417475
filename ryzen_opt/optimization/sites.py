"""Finding what ``optimize()`` can serve, and capturing the real inputs of every site.

A *run* is one forward pass of the whole model on typical shapes (a prefill, or a one-token
decode step after a cache). Running them with forward pre-hooks records the actual inputs
of every Linear, LayerNorm and attention site; each distinct input shape becomes a
:class:`Case` holding the original computation (``baseline``) and one :class:`Candidate` per
backend variant, both bound to those inputs.

Sites with the same kind, module type, weight shapes and dtype and the same captured input
shapes (the layers of a decoder stack) share one :attr:`Site.signature`: ``optimize()``
measures the first and gives the others its decision (:func:`mark_reuse`). Capture keeps one
set of input tensors per module signature, run and input shape, so the inputs of 24
identical layers cost one layer's activations; packed weight copies are made only when a
candidate runs, and :meth:`Site.release` drops them with the captured inputs.
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
from ryzen_opt.optimization.cache import DecisionCache
from ryzen_opt.optimization.config import DEFAULT_PREFILL_SHAPE
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
    """One backend variant bound to one case's inputs.

    ``args`` are the launcher's positional arguments (for ``supports``), or a function that
    makes them (a packed weight copy is made only when the candidate is measured).
    """

    name: str
    op: str
    backend: str
    args: tuple | Callable[[], tuple]
    call: Callable[[], torch.Tensor]
    packed: bool = False

    def arguments(self) -> tuple:
        return self.args() if callable(self.args) else self.args


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
    # What makes two sites' decisions interchangeable: kind, module type, weight shapes and
    # dtype, every case's input shapes (a DecisionCache key).
    signature: str = ""
    # The path of the earlier site with the same signature whose decision this one takes
    # (set by mark_reuse; such a site holds no cases).
    reuse_of: str | None = None
    free: Callable[[], None] | None = None  # drops what the candidates allocated

    def release(self) -> None:
        """Drop the captured inputs and whatever the candidates allocated (packed weights)."""
        self.cases = []
        if self.free is not None:
            self.free()


def mark_reuse(sites: list[Site]) -> None:
    """Point every site at the first earlier site of the same signature (``reuse_of``) and
    release its cases: it is not measured, it takes that site's decision."""
    first: dict[str, Site] = {}
    for site in sites:
        if not site.signature:
            continue
        rep = first.setdefault(site.signature, site)
        if rep is not site:
            site.reuse_of = rep.path
            site.release()


@dataclass
class Run:
    """One whole-model forward on typical shapes; ``call`` must not change ``state``.

    ``setup_s`` and ``call_s``: what each took when :func:`capture` ran them (the first
    time, so an upper bound), for estimating what the whole-model check will cost.
    """

    label: str
    shape: str
    setup: Callable[[nn.Module], Any]
    call: Callable[[nn.Module, Any], torch.Tensor]
    setup_s: float = 0.0
    call_s: float = 0.0
    # A prefill run and the decode run set up on the same inputs share one (see PrefillCache).
    shared: PrefillCache | None = None


class PrefillCache:
    """Hands the KV cache of the example's prefill run to the decode run of the same rows
    while :func:`capture` runs them, so that the decode set-up does not run the same forward
    again (a 16 x 128 prefill of Qwen2-0.5B took 8-10 s on 2 cores).

    Only :func:`capture` arms it. Outside it (the whole-model check, timing), and for a
    model other than the one that ran the prefill, every set-up runs its own forward.
    ``source_s``: how long the prefill call that made the cache took, which :func:`capture`
    books as the decode run's ``setup_s`` (the check, unarmed, pays that forward).
    """

    def __init__(self) -> None:
        self.armed = False
        self.took = False
        self.source_s = 0.0
        self._model: nn.Module | None = None
        self._cache: Any = None

    def offer(self, model: nn.Module, out: Any) -> None:
        """Keep ``out``'s cache (when armed and it has one) for the decode set-up."""
        if self.armed:
            cache = getattr(out, "past_key_values", None)
            self._model, self._cache = (model, cache) if cache is not None else (None, None)

    def take(self, model: nn.Module) -> Any:
        """The kept cache if ``model`` made it (then it is no longer kept), else ``None``."""
        cache, made_by = self._cache, self._model
        self._model = self._cache = None
        if cache is not None and made_by is model:
            self.took = True
            return cache
        return None

    def disarm(self) -> None:
        self.armed = False
        self._model = self._cache = None


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


def _prefill(config, prefill) -> tuple[int, int]:
    """The synthetic prefill shape: ``prefill`` (sized by the caller), else the config's."""
    return prefill or config.prefill_shape or DEFAULT_PREFILL_SHAPE


def stm_runs(model: SimpleTransformerModel, example, config, device, prefill=None) -> list[Run]:
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    runs: list[Run] = []
    if example is not None:
        prompt = example
        b, t = example.shape
        decode = [(db, t) for db in _example_batches(b, config)] if t + 1 <= cfg.max_seq_len else []
    else:
        b, t = _prefill(config, prefill)
        t = min(t, cfg.max_seq_len)
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


def hf_max_len(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 128)


def hf_last_logits_only(model: nn.Module) -> bool:
    """Whether the model's forward can return the last position's logits only."""
    return "logits_to_keep" in _forward_params(model)


def hf_runs(model: nn.Module, example, config, device, prefill=None) -> list[Run]:
    cfg = model.config
    max_len = hf_max_len(model)
    gen = torch.Generator().manual_seed(0)
    runs: list[Run] = []
    # generate() asks for the last position's logits only where the model allows it; so do
    # the runs: what is timed is what generation runs, and a 16 x 128 prefill of a
    # 152k-token vocabulary does not materialise 1.2 GB of logits nobody reads.
    keep = {"logits_to_keep": 1} if hf_last_logits_only(model) else {}
    shared = None  # the example's prefill cache, for the decode run of the same rows
    if example is not None:
        kw = {**keep, **example}  # keyword arguments (optimization/examples.py normalised them)
        ids = kw.get("input_ids")
        # (Not when the example brings its own cache: the prefill extends that one.)
        shared = PrefillCache() if "past_key_values" not in kw else None

        def prefill_call(m, k):
            out = m(**k)
            if shared is not None:
                shared.offer(m, out)
            return _logits(out)

        runs.append(Run("prefill", _shape_of(kw), lambda m, k=kw: k, prefill_call, shared=shared))
        if ids is None or ids.dim() != 2 or ids.shape[1] + 1 > max_len:
            return runs
        decode = []
        for db in _example_batches(ids.shape[0], config):
            rows = {k: _rows(v, db) if _is_rows(v, ids) else v for k, v in kw.items()}
            decode.append((rows, db, ids.shape[1]))
    else:
        b, t = _prefill(config, prefill)
        t = min(t, max_len)
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
        # The decode run on the example's own rows runs the prefill run's forward as its
        # set-up (``use_cache`` aside, which only adds the cache the prefill also returns).
        share = shared if shared is not None and db == ids.shape[0] else None

        def setup(m, kw=kw, share=share):
            cache = share.take(m) if share is not None else None
            if cache is None:
                cache = m(**{**kw, "use_cache": True}).past_key_values
            step = {
                "input_ids": kw["input_ids"][:, -1:],
                "past_key_values": cache,
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

        runs.append(Run("decode", f"{db}x1 after {p}", setup, call, shared=share))
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


def _arg_key(a: Any) -> Any:
    """A hashable description of an argument's layout (tensors: shape, strides, dtype,
    device); an object it cannot describe gets its identity (never shared)."""
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), tuple(a.stride()), str(a.dtype), str(a.device))
    if isinstance(a, (tuple, list)):
        return (type(a).__name__, *(_arg_key(x) for x in a))
    if isinstance(a, dict):
        return ("dict", *sorted((str(k), _arg_key(v)) for k, v in a.items()))
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    return ("id", id(a))


class _SharedRecords(list):
    """The HF attention call records of :class:`hf.capture`: a call whose module type, run,
    tensor layouts and other arguments an earlier call (of another layer) already had keeps
    that call's tensors instead of its own, so one layer's activations are held, not all."""

    def __init__(self) -> None:
        super().__init__()
        self._first: dict[Any, dict] = {}

    def append(self, rec: dict) -> None:
        key = (
            type(rec["module"]),
            rec["impl"],
            rec["label"],
            _arg_key(rec["args"]),
            _arg_key(rec["kwargs"]),
        )
        first = self._first.setdefault(key, rec)
        if first is not rec:
            rec = {**rec, "args": first["args"], "kwargs": first["kwargs"]}
        super().append(rec)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


# On a CPU a captured run's first call is timed again, warm, only when it took less than this.
WARM_CALL_S = 1.0


def capture(
    model: nn.Module,
    runs: list[Run],
    targets: dict[str, nn.Module],
    hf_on: bool,
    signatures: dict[str, Any] | None = None,
    device: torch.device | None = None,
):
    """Run ``runs``; return ``{path: [(label, args)]}`` and the HF attention call records.

    ``signatures``: per path, what makes modules interchangeable (kind, type, weight shapes):
    a call whose module signature, run and argument layouts an earlier call had records that
    call's tensors, and its own are freed with the run. Each run's ``setup_s`` and
    ``call_s`` (the faster of two calls; on a CPU one call from :data:`WARM_CALL_S` up) are
    set.
    """
    import time

    seen: dict[str, list[tuple[str, tuple]]] = {p: [] for p in targets}
    state = {"label": None}
    shared: dict[Any, tuple] = {}
    handles = []
    for path, mod in targets.items():
        sig = None if signatures is None else signatures.get(path)

        def hook(m, args, path=path, sig=sig):
            label = state["label"]
            if label is None:
                return
            if sig is not None:
                args = shared.setdefault((sig, label, _arg_key(args)), args)
            seen[path].append((label, args))

        handles.append(mod.register_forward_pre_hook(hook))
    rec = hf.capture() if hf_on else None
    if rec is not None:
        rec.records = _SharedRecords()
    shares = {id(r.shared): r.shared for r in runs if r.shared is not None}.values()
    for share in shares:
        share.armed = True
    try:
        with torch.no_grad():
            for run in runs:
                t0 = time.perf_counter()
                took = run.shared is not None and run.shared.took
                s = run.setup(model)
                _sync(device)
                t1 = time.perf_counter()
                state["label"] = run.label
                hf.set_label(run.label)
                if rec is not None:
                    with rec:
                        run.call(model, s)
                else:
                    run.call(model, s)
                _sync(device)
                state["label"] = None
                run.setup_s, run.call_s = t1 - t0, time.perf_counter() - t1
                if run.shared is not None:
                    if run.label == "prefill":
                        run.shared.source_s = run.call_s
                    elif run.shared.took and not took:  # its set-up took the prefill's cache
                        run.setup_s = run.shared.source_s
                # Once more, warm and unrecorded: a first call (allocator, kernel choice, lazy
                # set-up) took up to 20x longer, and the check's cost is estimated from this.
                # On a CPU not after a call of WARM_CALL_S or more: the first call's one-off
                # costs are a small part of it, and a second 16x128 prefill of Qwen2-0.5B on
                # 2 cores cost ~9 s of a 60 s budget. On a GPU a long first call is mostly
                # one-off set-up (libraries, compiles): always timed again.
                gpu = device is not None and device.type != "cpu"
                if gpu or run.call_s < WARM_CALL_S:
                    t2 = time.perf_counter()
                    run.call(model, s)
                    _sync(device)
                    run.call_s = min(run.call_s, time.perf_counter() - t2)
                del s
    finally:
        for h in handles:
            h.remove()
        for share in shares:
            share.disarm()
    return seen, (list(rec.records) if rec is not None else [])


def module_signature(kind: str, mod: nn.Module, activation: str | None = None) -> tuple:
    """What two modules must share for their decisions to be interchangeable (with the
    shapes of their inputs): kind, type, weight and bias shapes and dtypes, settings."""

    def t(x):
        return None if x is None else (tuple(x.shape), str(x.dtype))

    extra: tuple = ()
    if kind == "linear":
        extra = (t(mod.weight), t(mod.bias), activation)
    elif kind == "layer_norm":
        extra = (t(mod.weight), t(mod.bias), float(mod.eps), tuple(mod.normalized_shape))
    else:
        extra = tuple((n, t(p)) for n, p in mod.named_parameters()) + (
            getattr(mod, "num_heads", None),
        )
    return (kind, _qualname(mod), extra)


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
    w_t = w.t()
    held: dict[str, torch.Tensor] = {}

    def packed() -> torch.Tensor:
        # A (in, out) contiguous copy of the weight, made when a packed candidate first runs
        # and dropped by Site.release (an installed FusedLinear makes its own).
        if "w" not in held:
            held["w"] = w.t().contiguous()
        return held["w"]

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
            case.candidates.append(
                Candidate(
                    name,
                    "matmul",
                    name,
                    linear_args(x, w_t, b, activation),
                    lambda fn=fn, x=x: linear_call(fn, x, w_t, b, activation),
                )
            )
            case.candidates.append(
                Candidate(
                    f"{name}[packed]",
                    "matmul",
                    name,
                    lambda x=x: linear_args(x, packed(), b, activation),
                    lambda fn=fn, x=x: linear_call(fn, x, packed(), b, activation),
                    True,
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
    return Site(
        path,
        "linear",
        detail,
        _qualname(mod),
        cases,
        install,
        lambda label: "any",
        _signature(module_signature("linear", mod, activation), cases),
        free=held.clear,
    )


def _signature(static: tuple, cases: list[Case], extra: Any = None) -> str:
    """The site signature: the module's static description and every case's key."""
    return DecisionCache.key(module=static, cases=[c.key for c in cases], extra=extra)


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
        _signature(module_signature("layer_norm", mod), cases),
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
        path,
        "attention",
        f"causal self-attention, {mod.num_heads} heads",
        "sdpa",
        cases,
        install,
        signature=_signature(module_signature("attention", mod), cases),
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

    # Non-tensor arguments (scaling, sliding window, dropout) decide what the call computes.
    settings = sorted(
        (k, repr(v)) for r in recs for k, v in r["kwargs"].items() if not torch.is_tensor(v)
    )
    static = ("attention", _qualname(module), impl, getattr(module, "is_causal", None))
    return Site(
        path,
        "attention",
        f"{type(module).__name__} via AttentionInterface ({impl})",
        f"hf:{impl}",
        cases,
        install,
        signature=_signature(static, cases, sorted(set(settings))),
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
