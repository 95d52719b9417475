"""The CUDA fast paths: the ``SimpleTransformerModel`` step captured in CUDA graphs.

* ``cuda_graph_decode``: the decode step captured once per batch size in a CUDA graph, with
  the KV cache in static buffers and the position as a device tensor, replayed per token.
* ``triton_graph_decode``: the same graph over fused Triton kernels
  (:mod:`ryzen_opt.kernels.triton.decode_step`, which read the weights named by
  :data:`~ryzen_opt.optimization.fastpaths.layout.STM_LAYOUT`), ``5 * layers + 1`` kernels
  per step.
* ``cuda_graph_prefill``: the model's own prefill forward captured per measured
  ``(batch, seq)`` shape and replayed.

A graph holds the addresses of the parameters it was captured from; each keeps a
:class:`~ryzen_opt.optimization.fastpaths.layout.Binding` and is recaptured when they change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.optimization.fastpaths.layout import Binding, param_slots, served_reason
from ryzen_opt.optimization.fastpaths.lora import DeviceLoraTables, is_lora
from ryzen_opt.optimization.kvcache import KVBuffer, StaticKVCache


class _Graph:
    """One captured graph with its static inputs and outputs."""

    def __init__(self, graph, inputs: dict[str, Any], outputs: Any, binding: Binding) -> None:
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs
        self.binding = binding


def capture(fn: Callable[[], Any], device: torch.device):
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
        return served_reason(model, "cuda", "CUDA graphs need a CUDA device")

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

    def _build(self, model: SimpleTransformerModel, b: int, buf: KVBuffer | None = None) -> _Graph:
        """Capture batch ``b``'s step (into ``buf``, the cache of a graph being replaced, or a
        new one)."""
        cfg = model.config
        w = model.tok_emb.weight
        dev, dtype = w.device, w.dtype
        layers, h, d, t_max = len(model.blocks), cfg.num_heads, cfg.head_dim, cfg.max_seq_len
        if buf is None:
            buf = KVBuffer(layers, b, h, t_max, d, dev, dtype)
        ids = torch.zeros(b, dtype=torch.int64, device=dev)
        pos = torch.zeros(1, dtype=torch.int64, device=dev)
        step, extra = self._make_step(model, b, buf, ids, pos)
        with torch.no_grad():
            graph, logits = capture(step, dev)
        inputs = {"ids": ids, "pos": pos, "buffer": buf, **extra}
        return _Graph(graph, inputs, logits, Binding(model))

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

    def _current(self, model: SimpleTransformerModel, g: _Graph) -> _Graph:
        """``g``, or its replacement when what it reads besides the parameters changed."""
        return g

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
        g = self._current(model, self.graphs[idx.shape[0]])
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
    # Unmerged LoRA adapters (one active, or one per row) are added inside the step's kernels
    # from device tables (:class:`~ryzen_opt.optimization.fastpaths.lora.DeviceLoraTables`).
    serves_lora = True

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
        params = {name: getattr(mod, attr) for name, mod, attr in param_slots(model)}
        if not all(p.is_contiguous() for p in params.values()):
            raise ValueError("the triton decode step needs contiguous parameters")
        ws = Workspace(b, cfg.embedding_dim, cfg.ff_dim, cfg.vocab_size, w.device, w.dtype)
        eps, heads = model.ln_f.eps, cfg.num_heads
        tables = DeviceLoraTables(model, b) if any(map(is_lora, model.modules())) else None
        if tables is not None:
            tables.sync()  # the capture's warm-up runs on the current state
        lora = tables.slots if tables is not None else None

        def step():
            return decode_step(params, ids, pos, buf.k, buf.v, ws, heads=heads, eps=eps, lora=lora)

        # The graph writes into ``ws`` and reads ``params`` and the LoRA tables: all must
        # outlive the capture.
        return step, {"workspace": ws, "params": params, "lora": tables}

    def _current(self, model: SimpleTransformerModel, g: _Graph) -> _Graph:
        tables = g.inputs["lora"]
        if tables is None or tables.sync():
            return g
        # More adapters (or a larger rank) than the tables hold: new tables, a new capture
        # over the same cache.
        b, buf = g.inputs["ids"].shape[0], g.inputs["buffer"]
        # The capture's warm-up runs write a step's key and value into the cache, which holds
        # this generation's: kept aside and put back.
        k, v = buf.k.clone(), buf.v.clone()
        g = self.graphs[b] = self._build(model, b, buf=buf)
        buf.k.copy_(k)
        buf.v.copy_(v)
        return g


class CudaGraphPrefill(_CudaGraphPath):
    """The model's own prefill forward (no cache) captured per ``(batch, seq)`` shape."""

    kind = "prefill"
    name = "cuda_graph_prefill"

    def _build(self, model: SimpleTransformerModel, shape: tuple[int, int]) -> _Graph:
        dev = model.tok_emb.weight.device
        idx = torch.zeros(shape, dtype=torch.int64, device=dev)
        with torch.no_grad():
            graph, out = capture(lambda: SimpleTransformerModel._forward(model, idx, None, 0), dev)
        return _Graph(graph, {"idx": idx}, out, Binding(model))

    def prepare_shape(self, model, shape: tuple[int, int]) -> _Graph:
        return self._entry(model, shape, lambda: self._build(model, shape))

    def __call__(self, model: SimpleTransformerModel, idx: torch.Tensor, kv_cache, past_len: int):
        g = self.prepare_shape(model, tuple(idx.shape))
        g.inputs["idx"].copy_(idx)
        g.graph.replay()
        logits, presents = g.outputs
        return logits.clone(), tuple((k.clone(), v.clone()) for k, v in presents)
