"""Model-level fast paths for the ``SimpleTransformerModel`` family.

Per-op kernels cannot win where a step is dominated by dispatch: a one-token decode step of
the baseline is ~30 small PyTorch ops per layer, each costing more to launch than to run.
The fast paths here replace the whole step:

* ``numba_fused_decode[serial]`` / ``numba_fused_decode[pool]`` (CPU, float32): one Numba
  call per token runs every layer (:mod:`ryzen_opt.kernels.numba.decode_step`), reading the
  weights from one arena and writing a preallocated KV cache; ``serial`` stays on the calling
  thread, ``pool`` spreads each matmul over Numba's threads. Greedy ``generate`` runs its
  whole token loop, argmax and ``eos_id`` included, in one Numba call.
* ``cuda_graph_decode`` (CUDA): the decode step captured once per batch size in a CUDA graph,
  with the KV cache in static buffers and the position as a device tensor, replayed per token.
* ``triton_graph_decode`` (CUDA): the same graph over fused Triton kernels
  (:mod:`ryzen_opt.kernels.triton.decode_step`), ``5 * layers + 1`` kernels per step.
* ``cuda_graph_prefill`` (CUDA): the model's own prefill forward captured per measured
  ``(batch, seq)`` shape and replayed.

``optimize()`` treats each like a kernel candidate: it verifies the logits (two consecutive
decode steps, so the cache writes are checked too) against the model, times it against the
model with the same interleaved comparison, and installs it only where it is faster beyond
the noise. Installing switches the model's class to :class:`FastPathTransformer` (a
subclass: same ``state_dict`` keys, same ``forward``/``generate`` contract), which routes the
served shapes to the fast path and everything else to the ordinary code.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ryzen_opt.models.model import MLP, CausalSelfAttention, SimpleTransformerModel
from ryzen_opt.optimization.kvcache import KVBuffer, StaticKVCache

FAST_PATHS = (
    "numba_fused_decode[serial]",
    "numba_fused_decode[pool]",
    "cuda_graph_decode",
    "triton_graph_decode",
    "cuda_graph_prefill",
)
# Parameter names relative to ``blocks.<i>.``, in the column order of the fused step's
# layer offset table, then the model-level ones in the order of its global table.
LAYER_PARAMS = (
    "ln1.weight",
    "ln1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "ln2.weight",
    "ln2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)
GLOBAL_PARAMS = ("tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias", "head.weight")


# ----------------------------------------------------------------------------- structure


def structure_reason(model: nn.Module) -> str | None:
    """``None`` if ``model`` computes exactly what ``SimpleTransformerModel`` does, else why not.

    The fast paths re-implement the forward, so they serve only modules whose computation is
    known: the baseline's (or ``optimize()``'s drop-in replacements of) attention, MLP with
    exact GELU, LayerNorm with weight and bias, and a bias-free head.
    """
    from ryzen_opt.optimization.modules import FusedMLP, OptimizedSelfAttention

    if not isinstance(model, SimpleTransformerModel):
        return f"{type(model).__name__} is not a SimpleTransformerModel"
    cfg = model.config
    norms = [model.ln_f] + [n for b in model.blocks for n in (b.ln1, b.ln2)]
    for n in norms:
        if not isinstance(n, nn.LayerNorm) or n.weight is None or n.bias is None:
            return "a LayerNorm without weight and bias"
        if n.normalized_shape != (cfg.embedding_dim,) or n.eps != norms[0].eps:
            return "LayerNorms with different shapes or eps"
    for i, b in enumerate(model.blocks):
        if type(b.attn) not in (CausalSelfAttention, OptimizedSelfAttention):
            return f"blocks.{i}.attn is a {type(b.attn).__name__}"
        mlp = b.mlp
        exact_gelu = type(mlp) is MLP or (
            type(mlp) is FusedMLP and getattr(mlp.fc1, "activation", None) == "gelu"
        )
        if not exact_gelu:
            return f"blocks.{i}.mlp is a {type(mlp).__name__} with an unknown activation"
        for lin in (b.attn.qkv, b.attn.proj, mlp.fc1, mlp.fc2):
            if not isinstance(lin, nn.Linear) or lin.bias is None:
                return f"blocks.{i} has a Linear without bias"
    if model.head.bias is not None:
        return "the head has a bias"
    return None


def _param_slots(model: SimpleTransformerModel) -> list[tuple[str, nn.Module, str]]:
    """``(name, owning module, attribute)`` of every parameter a fast path reads."""
    names = [f"blocks.{i}.{p}" for i in range(len(model.blocks)) for p in LAYER_PARAMS]
    names += list(GLOBAL_PARAMS)
    out = []
    for name in names:
        path, _, attr = name.rpartition(".")
        out.append((name, model.get_submodule(path), attr))
    return out


class _Binding:
    """The parameter objects a fast path was built from, to notice when they change.

    ``load_state_dict`` writes into the same storage (nothing to notice); ``.to()``,
    ``.half()`` or assigning a new ``Parameter`` replace it, and then the path is rebuilt.
    Checked on every step, so it is written for speed (~24 parameters, a few microseconds).
    """

    def __init__(self, model: SimpleTransformerModel) -> None:
        slots = _param_slots(model)
        self.dicts = [mod._parameters for _, mod, _ in slots]
        self.attrs = [attr for _, _, attr in slots]
        self.params = [d[a] for d, a in zip(self.dicts, self.attrs, strict=True)]
        self.ptrs = [p.data_ptr() for p in self.params]

    def current(self) -> bool:
        return all(map(operator.is_, map(dict.get, self.dicts, self.attrs), self.params)) and (
            list(map(torch.Tensor.data_ptr, self.params)) == self.ptrs
        )


def _no_autograd(model: SimpleTransformerModel) -> bool:
    return not (torch.is_grad_enabled() and model.tok_emb.weight.requires_grad)


# ----------------------------------------------------------------------------- CPU: Numba


class _Arena:
    """Every parameter of the model in one float32 tensor; the Parameters become views of it.

    The model's ``state_dict`` keys and values are unchanged (a tied head stays tied: one
    Parameter, one slot). Memory does not grow: the old storages are released.
    """

    def __init__(self, model: SimpleTransformerModel) -> None:
        slots = _param_slots(model)
        offsets: dict[int, int] = {}
        unique: list[nn.Parameter] = []
        total = 0
        for _, mod, attr in slots:
            p = mod._parameters[attr]
            if id(p) not in offsets:
                offsets[id(p)] = total
                unique.append(p)
                total += p.numel()
        flat = torch.empty(total, dtype=torch.float32)
        with torch.no_grad():
            for p in unique:
                o = offsets[id(p)]
                view = flat[o : o + p.numel()].view_as(p)
                view.copy_(p.detach())
                p.data = view
        self.flat = flat
        self.array = flat.numpy()
        n_layer = len(LAYER_PARAMS)
        ids = [offsets[id(mod._parameters[attr])] for _, mod, attr in slots]
        n_layers = len(model.blocks)
        self.layer_offsets = np.array(ids[: n_layers * n_layer], dtype=np.int64).reshape(
            n_layers, n_layer
        )
        self.global_offsets = np.array(ids[n_layers * n_layer :], dtype=np.int64)
        assert len(self.global_offsets) == len(GLOBAL_PARAMS)
        self.binding = _Binding(model)


class NumbaFusedDecode:
    """One Numba call per decode step (see the module docstring).

    Args:
        mode: ``"serial"`` (calling thread only) or ``"pool"`` (Numba's thread pool, sized
            like torch's).
    """

    kind = "decode"

    def __init__(self, mode: str) -> None:
        if mode not in ("serial", "pool"):
            raise ValueError(f"mode must be 'serial' or 'pool', got {mode!r}")
        self.mode = mode
        self.name = f"numba_fused_decode[{mode}]"
        self._workspaces: dict[tuple[int, int], np.ndarray] = {}

    def why_not(self, model: nn.Module) -> str | None:
        reason = structure_reason(model)
        if reason is not None:
            return reason
        w = model.tok_emb.weight
        if w.device.type != "cpu":
            return f"the model is on {w.device}, the fused Numba step runs on cpu"
        if any(p.dtype != torch.float32 for p in model.parameters()):
            return "the fused Numba step is float32 only"
        try:
            from ryzen_opt.kernels.numba import decode_step  # noqa: F401
        except Exception as e:  # numba missing or broken: the reason goes into the report
            return f"numba unavailable: {type(e).__name__}: {e}"
        return None

    def prepare(self, model: SimpleTransformerModel) -> None:
        """Lay the weights out in the arena (shared by both modes; redone when stale)."""
        arena = model.__dict__.get("_ryzen_arena")
        if arena is None or not arena.binding.current():
            model.__dict__["_ryzen_arena"] = _Arena(model)

    def adopt(self, model: SimpleTransformerModel, cache) -> StaticKVCache:
        """``cache`` (tuple-like) as a static cache this path can step from."""
        if isinstance(cache, StaticKVCache) and self._usable(cache):
            return cache
        return StaticKVCache.from_cache(cache, model.config.max_seq_len)

    @staticmethod
    def _usable(cache: StaticKVCache) -> bool:
        return cache.buffer.arrays is not None and cache.writable()

    def _workspace(self, cfg, b: int) -> np.ndarray:
        # Per (thread, batch): concurrent callers never share one; sized once, not per step.
        key = (threading.get_ident(), b)
        ws = self._workspaces.get(key)
        if ws is None:
            from ryzen_opt.kernels.numba.decode_step import workspace_size

            size = workspace_size(b, cfg.embedding_dim, cfg.ff_dim, cfg.num_heads, cfg.max_seq_len)
            ws = self._workspaces[key] = np.empty(size, dtype=np.float32)
        return ws

    def kernel_args(self, model: SimpleTransformerModel, b: int) -> tuple:
        """The fused kernels' arguments that do not change per step, around the per-step ones:
        ``(weights..., eps)`` and ``(workspace, threads)`` for ``b`` rows."""
        from ryzen_opt.kernels.numba._common import set_threads

        arena = self._arena(model)
        cfg = model.config
        head = (
            arena.array,
            arena.layer_offsets,
            arena.global_offsets,
            cfg.num_heads,
            cfg.ff_dim,
            model.ln_f.eps,
        )
        return head, (self._workspace(cfg, b), set_threads() if self.mode == "pool" else 1)

    def _arena(self, model: SimpleTransformerModel) -> _Arena:
        arena = model.__dict__.get("_ryzen_arena")
        if arena is None or not arena.binding.current():
            self.prepare(model)
            arena = model.__dict__["_ryzen_arena"]
        return arena

    def greedy(
        self,
        model: SimpleTransformerModel,
        first: torch.Tensor,
        kv_cache,
        past_len: int,
        steps: int,
        eos_id: int | None = None,
    ) -> torch.Tensor:
        """Up to ``steps`` greedy tokens after ``first`` (``(batch,)``, fed at ``past_len``) in
        one Numba call: the step, the argmax, ``eos_id``'s stopping rule and the feedback all
        stay compiled. Fewer columns come back when every row stopped early."""
        from ryzen_opt.kernels.numba.decode_step import greedy_steps

        b = first.shape[0]
        head, tail = self.kernel_args(model, b)
        cache = self.adopt(model, kv_cache)
        ids = first.to(torch.int64).reshape(b).clone()
        out = torch.empty((b, steps), dtype=torch.int64)
        logits = torch.empty((b, model.config.vocab_size), dtype=torch.float32)
        k_arr, v_arr = cache.buffer.arrays
        ran = greedy_steps(
            *head, ids.numpy(), past_len, steps, k_arr, v_arr, logits.numpy(), *tail,
            out.numpy(), eos_id,
        )  # fmt: skip
        return out[:, :ran]

    def __call__(self, model: SimpleTransformerModel, idx: torch.Tensor, kv_cache, past_len: int):
        # Every line here runs once per token: each costs microseconds against a ~150 us step.
        from ryzen_opt.kernels.numba.decode_step import decode_step

        b = idx.shape[0]
        head, tail = self.kernel_args(model, b)
        cache = self.adopt(model, kv_cache)
        if idx.dtype != torch.int64 or not idx.is_contiguous():
            idx = idx.to(torch.int64).contiguous()
        logits = torch.empty((b, 1, model.config.vocab_size), dtype=torch.float32)
        k_arr, v_arr = cache.buffer.arrays
        decode_step(
            *head, idx.numpy().reshape(b), past_len, k_arr, v_arr,
            logits.numpy().reshape(b, -1), *tail,
        )  # fmt: skip
        return logits, cache.advanced()


# ----------------------------------------------------------------------------- CUDA graphs


class _Graph:
    """One captured graph with its static inputs and outputs."""

    def __init__(self, graph, inputs: dict[str, Any], outputs: Any, binding: _Binding) -> None:
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs
        self.binding = binding


def _capture(fn: Callable[[], Any], device: torch.device):
    """Warm ``fn`` up on a side stream (as capture requires), then capture it in a graph."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class _CudaGraphPath:
    """Shared parts of the two CUDA-graph paths: applicability, lazy per-shape capture."""

    kind = ""
    name = ""

    def __init__(self) -> None:
        self.graphs: dict[Any, _Graph] = {}

    def __deepcopy__(self, memo):  # graphs hold the original's addresses: recapture lazily
        return type(self)()

    def why_not(self, model: nn.Module) -> str | None:
        reason = structure_reason(model)
        if reason is not None:
            return reason
        w = model.tok_emb.weight
        if w.device.type != "cuda":
            return f"the model is on {w.device}, CUDA graphs need a CUDA device"
        return None

    def _entry(self, model, key, build: Callable[[], _Graph]) -> _Graph:
        g = self.graphs.get(key)
        if g is None or not g.binding.current():
            g = self.graphs[key] = build()
        return g


class CudaGraphDecode(_CudaGraphPath):
    """The one-token decode step in a CUDA graph, one graph and static cache per batch size.

    The graph reads the token ids and the position from static device tensors, writes the
    new key/value at that position with ``index_copy_`` and attends over the whole buffer
    under a ``key <= position`` mask, so one capture serves every position.
    """

    kind = "decode"
    name = "cuda_graph_decode"

    def _build(self, model: SimpleTransformerModel, b: int) -> _Graph:
        cfg = model.config
        w = model.tok_emb.weight
        dev, dtype = w.device, w.dtype
        layers, h, d, t_max = len(model.blocks), cfg.num_heads, cfg.head_dim, cfg.max_seq_len
        buf = KVBuffer(layers, b, h, t_max, d, dev, dtype)
        ids = torch.zeros(b, dtype=torch.int64, device=dev)
        pos = torch.zeros(1, dtype=torch.int64, device=dev)
        step, extra = self._make_step(model, b, buf, ids, pos)
        with torch.no_grad():
            graph, logits = _capture(step, dev)
        inputs = {"ids": ids, "pos": pos, "buffer": buf, **extra}
        return _Graph(graph, inputs, logits, _Binding(model))

    def _make_step(self, model: SimpleTransformerModel, b: int, buf: KVBuffer, ids, pos):
        """The step to capture (PyTorch ops) and the static inputs it adds (the mask)."""
        cfg = model.config
        dev = ids.device
        c, h, d, t_max = cfg.embedding_dim, cfg.num_heads, cfg.head_dim, cfg.max_seq_len
        keys = torch.arange(t_max, device=dev)
        # Row p: the additive mask of position p, precomputed once (t_max^2 floats).
        masks = torch.zeros(t_max, 1, 1, t_max, device=dev).masked_fill_(
            (keys[None, :] > keys[:, None]).view(t_max, 1, 1, t_max), float("-inf")
        )
        # An additive mask (0 for keys <= position, -inf after), a static input written before
        # each replay by one small kernel. Computed inside the graph from ``pos``, a mask went
        # stale after the first replay on torch 2.11 / H100 (tests/optimizer/test_fastpath.py).
        mask = torch.zeros(1, 1, t_max, dtype=torch.float32, device=dev)
        eps = model.ln_f.eps
        scale = d**-0.5

        def step():
            x = F.embedding(ids, model.tok_emb.weight) + F.embedding(pos, model.pos_emb.weight)
            for i, blk in enumerate(model.blocks):
                a = F.layer_norm(x, (c,), blk.ln1.weight, blk.ln1.bias, eps)
                qkv = F.linear(a, blk.attn.qkv.weight, blk.attn.qkv.bias).view(b, 3, h, 1, d)
                buf.k[i].index_copy_(2, pos, qkv[:, 1])
                buf.v[i].index_copy_(2, pos, qkv[:, 2])
                # Attention written out: QK^T + mask in one baddbmm, softmax, PV (fp32 math).
                # SDPA's memory-efficient kernel with a mask took 16.5 us of a ~95 us step here.
                q = qkv[:, 0].reshape(b * h, 1, d).float()
                k = buf.k[i].view(b * h, t_max, d).float()
                v = buf.v[i].view(b * h, t_max, d).float()
                p = torch.softmax(torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale), dim=-1)
                y = torch.bmm(p, v).to(x.dtype)
                x = x + F.linear(y.reshape(b, c), blk.attn.proj.weight, blk.attn.proj.bias)
                a = F.layer_norm(x, (c,), blk.ln2.weight, blk.ln2.bias, eps)
                a = F.gelu(F.linear(a, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
                x = x + F.linear(a, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
            x = F.layer_norm(x, (c,), model.ln_f.weight, model.ln_f.bias, eps)
            return F.linear(x, model.head.weight)

        return step, {"masks": masks, "mask": mask}

    @staticmethod
    def load_inputs(g: _Graph, idx: torch.Tensor, past_len: int) -> None:
        """Write one step's token ids and position (and, if the graph has one, the mask row
        of that position: 0 for keys <= past_len, -inf after) into ``g``'s static inputs."""
        g.inputs["ids"].copy_(idx.reshape(-1))
        g.inputs["pos"].fill_(past_len)
        if "mask" in g.inputs:
            g.inputs["mask"].copy_(g.inputs["masks"][past_len])

    def adopt(self, model: SimpleTransformerModel, cache) -> StaticKVCache | None:
        """A writable view of ``cache`` in this batch size's static buffer (``None``: busy)."""
        g = self._entry(
            model, cache[0][0].shape[0], lambda: self._build(model, cache[0][0].shape[0])
        )
        buf = g.inputs["buffer"]
        if isinstance(cache, StaticKVCache) and cache.buffer is buf and cache.writable():
            return cache
        if buf.has_view_longer_than(-1):  # another generation lives in this buffer
            return None
        return StaticKVCache.from_cache(cache, buf.max_len, buffer=buf)

    def __call__(self, model: SimpleTransformerModel, idx: torch.Tensor, kv_cache, past_len: int):
        cache = self.adopt(model, kv_cache)
        if cache is None:
            return None
        g = self.graphs[idx.shape[0]]
        self.load_inputs(g, idx, past_len)
        g.graph.replay()
        # A copy: the next replay overwrites the static output.
        return g.outputs.clone().unsqueeze(1), cache.advanced()


class TritonGraphDecode(CudaGraphDecode):
    """The decode step as a CUDA graph of the fused Triton kernels of
    :mod:`ryzen_opt.kernels.triton.decode_step`: ``5 * layers + 1`` kernels instead of about
    15 PyTorch ops a layer in :class:`CudaGraphDecode`. The kernels read the position from
    device memory and mask by it, so no mask is written before a replay."""

    name = "triton_graph_decode"

    def why_not(self, model: nn.Module) -> str | None:
        reason = super().why_not(model)
        if reason is not None:
            return reason
        try:
            from ryzen_opt.kernels.triton import decode_step
        except Exception as e:  # triton missing or broken: the reason goes into the report
            return f"triton unavailable: {type(e).__name__}: {e}"
        cfg = model.config
        return decode_step.supports(
            cfg.embedding_dim, cfg.ff_dim, cfg.num_heads, model.tok_emb.weight.device
        )

    def _make_step(self, model: SimpleTransformerModel, b: int, buf: KVBuffer, ids, pos):
        from ryzen_opt.kernels.triton.decode_step import Workspace, decode_step

        cfg = model.config
        w = model.tok_emb.weight
        params = {name: getattr(mod, attr) for name, mod, attr in _param_slots(model)}
        if not all(p.is_contiguous() for p in params.values()):
            raise ValueError("the triton decode step needs contiguous parameters")
        ws = Workspace(b, cfg.embedding_dim, cfg.ff_dim, cfg.vocab_size, w.device, w.dtype)
        eps, heads = model.ln_f.eps, cfg.num_heads

        def step():
            return decode_step(params, ids, pos, buf.k, buf.v, ws, heads=heads, eps=eps)

        # The graph writes into ``ws`` and reads ``params``: both must outlive the capture.
        return step, {"workspace": ws, "params": params}


class CudaGraphPrefill(_CudaGraphPath):
    """The model's own prefill forward (no cache) captured per ``(batch, seq)`` shape."""

    kind = "prefill"
    name = "cuda_graph_prefill"

    def _build(self, model: SimpleTransformerModel, shape: tuple[int, int]) -> _Graph:
        dev = model.tok_emb.weight.device
        idx = torch.zeros(shape, dtype=torch.int64, device=dev)
        with torch.no_grad():
            graph, out = _capture(lambda: SimpleTransformerModel._forward(model, idx, None, 0), dev)
        return _Graph(graph, {"idx": idx}, out, _Binding(model))

    def prepare_shape(self, model, shape: tuple[int, int]) -> _Graph:
        return self._entry(model, shape, lambda: self._build(model, shape))

    def __call__(self, model: SimpleTransformerModel, idx: torch.Tensor, kv_cache, past_len: int):
        g = self.prepare_shape(model, tuple(idx.shape))
        g.inputs["idx"].copy_(idx)
        g.graph.replay()
        logits, presents = g.outputs
        return logits.clone(), tuple((k.clone(), v.clone()) for k, v in presents)


def make_path(name: str):
    """A fresh fast path by name (one of :data:`FAST_PATHS`)."""
    if name.startswith("numba_fused_decode["):
        return NumbaFusedDecode(name[len("numba_fused_decode[") : -1])
    if name == "cuda_graph_decode":
        return CudaGraphDecode()
    if name == "triton_graph_decode":
        return TritonGraphDecode()
    if name == "cuda_graph_prefill":
        return CudaGraphPrefill()
    raise ValueError(f"unknown fast path {name!r}; known: {FAST_PATHS}")


# ----------------------------------------------------------------------------- routing


class FastPaths:
    """The installed fast paths of one model and the shapes each serves.

    Args:
        decode: ``(lowest batch, highest batch, path)`` ranges, from measured batches.
        prefill: ``{(batch, seq): path}`` for measured prefill shapes.
    """

    def __init__(
        self,
        decode: list[tuple[int, int, Any]] | None = None,
        prefill: dict[tuple[int, int], Any] | None = None,
    ) -> None:
        self.decode = list(decode or [])
        self.prefill = dict(prefill or {})

    def describe(self) -> list[str]:
        out = [f"decode batch {lo}-{hi}: {p.name}" for lo, hi, p in self.decode]
        out += [f"prefill {b}x{t}: {p.name}" for (b, t), p in self.prefill.items()]
        return out

    def decode_path(self, batch: int):
        """The decode fast path serving ``batch`` rows, or ``None``."""
        for lo, hi, path in self.decode:
            if lo <= batch <= hi:
                return path
        return None

    def greedy(
        self,
        model: SimpleTransformerModel,
        idx: torch.Tensor,
        max_new_tokens: int,
        eos_id: int | None = None,
    ):
        """``generate(idx, max_new_tokens, eos_id=eos_id)`` under greedy decoding with the whole
        token loop in the decode path (one call for every step), or ``None`` if that path has
        no such loop (then ``generate`` runs its ordinary per-token loop over the same step).

        The caller has validated the arguments (``_check_generation``); the prompt runs
        through :meth:`run`'s routing.
        """
        path = self.decode_path(idx.shape[0])
        if path is None or not hasattr(path, "greedy") or max_new_tokens < 2:
            return None  # (generate never records autograd: no autograd check here)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits, cache = model._forward(idx, None, 0)
                first = logits[:, -1].argmax(dim=-1)
                if eos_id is not None and bool((first == eos_id).all()):
                    return torch.cat([idx, first[:, None]], dim=1)  # every row stopped at once
                rest = path.greedy(
                    model, first, cache, idx.shape[1], max_new_tokens - 1, eos_id=eos_id
                )
        finally:
            model.train(was_training)
        if rest is None:  # the path declined (its buffer is in use): the ordinary loop
            return None
        return torch.cat([idx, first[:, None], rest.to(first.device)], dim=1)

    def run(self, model: SimpleTransformerModel, idx: torch.Tensor, kv_cache, past_len: int):
        """The fast path's ``(logits, cache)`` for this call, or ``None`` to run the model."""
        if model.training or not _no_autograd(model):
            return None
        if kv_cache is None:
            path = self.prefill.get((idx.shape[0], idx.shape[1]))
            return None if path is None else path(model, idx, None, 0)
        if idx.shape[1] != 1 or past_len >= model.config.max_seq_len:
            return None
        path = self.decode_path(idx.shape[0])
        return None if path is None else path(model, idx, kv_cache, past_len)


class FastPathTransformer(SimpleTransformerModel):
    """A ``SimpleTransformerModel`` whose measured shapes run a model-level fast path.

    ``optimize()`` switches a model to this class when a fast path won; its parameters,
    ``state_dict`` keys, ``forward``/``generate`` contract and outputs (within the dtype
    tolerance) are the original's. Calls outside the served shapes, in training mode or
    with autograd on run the ordinary code. The KV cache it returns from a fast step is a
    :class:`~ryzen_opt.optimization.kvcache.StaticKVCache`, which indexes like the tuple
    cache.
    """

    def _forward(self, idx, kv_cache, past_len):
        paths = self.__dict__.get("_fast_paths")
        if paths is not None:
            out = paths.run(self, idx, kv_cache, past_len)
            if out is not None:
                return out
        return super()._forward(idx, kv_cache, past_len)

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
        """As ``SimpleTransformerModel.generate``; greedy decoding runs the whole token loop
        (``eos_id`` included) in the decode fast path where it has one (the fused Numba step)."""
        paths = self.__dict__.get("_fast_paths")
        if paths is not None and temperature == 0 and use_cache:
            self._check_generation(idx, max_new_tokens, temperature, top_k, top_p, eos_id, seed)
            out = paths.greedy(self, idx, max_new_tokens, eos_id)
            if out is not None:
                return out
        return super().generate(
            idx, max_new_tokens, temperature, top_k, top_p, eos_id, seed, use_cache
        )


def install(model: SimpleTransformerModel, paths: FastPaths) -> Callable[[], None]:
    """Route ``model``'s served shapes to ``paths``; returns the undo function."""
    old_cls = model.__class__
    old = model.__dict__.get("_fast_paths")
    model.__class__ = FastPathTransformer
    model.__dict__["_fast_paths"] = paths

    def undo() -> None:
        model.__class__ = old_cls
        if old is None:
            model.__dict__.pop("_fast_paths", None)
        else:
            model.__dict__["_fast_paths"] = old

    return undo
