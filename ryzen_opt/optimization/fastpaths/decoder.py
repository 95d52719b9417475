"""Whole-step decode paths for Hugging Face decoders (the families in
:mod:`ryzen_opt.optimization.families`), behind one small interface.

A *stepper* owns a static KV cache for one batch size and runs one decode step of the
:class:`~ryzen_opt.optimization.fastpaths.decoder_layout.DecoderLayout` contract:

* ``load(past_key_values, prompt_len, start)``: take over the cache the model's own prefill
  built (prefill stays the model's code: it is compute-bound and already fast);
* ``step(ids, t) -> logits``: one token per row at slot ``t`` (writes the cache);
* ``greedy(ids, t0, n, eos, pad, finished, block) -> (tokens, steps)``: the greedy loop from
  slot ``t0``; rows that emitted an eos id continue with ``pad`` (as ``generate`` does); in
  the first ``block`` steps the eos ids cannot be chosen (``min_new_tokens``).

Paths (``PATHS``, name -> class):

* ``torch_static_decode`` (CPU and CUDA): :func:`reference_step` over the static cache, no
  per-step cache growth or HF bookkeeping;
* ``cuda_graph_decode`` (CUDA): the same step captured once in a CUDA graph; the greedy loop
  captures argmax, the eos/pad update and the position increment in the graph too, so a token
  costs one graph replay and no host synchronisation (the host checks "all rows done" once
  every ``SYNC_EVERY`` tokens);
* ``triton_graph_decode`` (CUDA): the graph over the fused Triton kernels of
  :mod:`ryzen_opt.kernels.triton.decoder_step`, and the greedy loop's per-token bookkeeping
  in one kernel (:mod:`ryzen_opt.kernels.triton.greedy_tail`);
* ``numba_decoder[fp32]`` / ``numba_decoder[int8]`` / ``numba_decoder[bf16]`` (CPU): the step
  and the whole greedy loop in one Numba call each (:mod:`ryzen_opt.kernels.numba.decoder_step`);
  ``int8`` (weight-only, per-output-channel scales) and ``bf16`` (weights rounded to bfloat16,
  offered on CPUs with AVX512-BF16 only) are opt-in and report their error.

Every path is checked and timed by :mod:`ryzen_opt.optimization.fastpaths.hf_select` before it
is used; :mod:`ryzen_opt.optimization.fastpaths.generate` routes ``generate`` to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ryzen_opt.kernels import reference
from ryzen_opt.optimization.fastpaths.cuda_graph import capture
from ryzen_opt.optimization.fastpaths.decoder_layout import DecoderLayout, reference_step

# Host checks for "every row finished" this often in the graph greedy loop: a check costs a
# synchronisation; a late check costs at most this many wasted steps at the very end.
SYNC_EVERY = 16
DEFAULT_PATHS = (
    "torch_static_decode",
    "cuda_graph_decode",
    "triton_graph_decode",
    "numba_decoder[fp32]",
)
OPT_IN_PATHS = ("numba_decoder[int8]", "numba_decoder[bf16]")
DECODER_PATHS = DEFAULT_PATHS + OPT_IN_PATHS


def kv_of(past: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``i``'s ``(k, v)`` ``(batch, kv_heads, len, head_dim)`` of a transformers cache
    (4.x ``DynamicCache.key_cache``, 5.x ``.layers[i].keys``) or a legacy tuple cache."""
    layers = getattr(past, "layers", None)
    if layers is not None and hasattr(layers[i], "keys"):
        return layers[i].keys, layers[i].values
    if hasattr(past, "key_cache"):
        return past.key_cache[i], past.value_cache[i]
    return past[i][0], past[i][1]


def load_cache(k: torch.Tensor, v: torch.Tensor, past: Any, prompt_len: int) -> None:
    """Copy the first ``prompt_len`` positions of a transformers cache into the contract's
    ``(layers, batch, kv_heads, T, head_dim)`` buffers (converting the dtype if they differ)."""
    for i in range(k.shape[0]):
        pk, pv = kv_of(past, i)
        k[i, :, :, :prompt_len].copy_(pk[:, :, :prompt_len])
        v[i, :, :, :prompt_len].copy_(pv[:, :, :prompt_len])


def cache_len(needed: int, max_positions: int) -> int:
    """Slots to allocate for ``needed``: the next power of two >= 256, within the context, so
    that one buffer (and one captured graph) serves many calls."""
    n = 256
    while n < needed:
        n *= 2
    return max(needed, min(n, max_positions))


class Stepper:
    """The ``torch_static_decode`` path, and the base of the others."""

    name = "torch_static_decode"

    @staticmethod
    def why_not(layout: DecoderLayout) -> str | None:
        return None

    def __init__(
        self, layout: DecoderLayout, batch: int, max_len: int, shared: dict | None = None
    ) -> None:
        # ``shared``: state every batch size's stepper of one model reuses (a Numba decoder
        # and its int8 weights), owned by the caller so it dies with the model.
        self.layout, self.batch, self.max_len = layout, batch, max_len
        self.shared = {} if shared is None else shared
        self.k, self.v = layout.new_cache(batch, max_len)
        self.start = torch.zeros(batch, dtype=torch.int64, device=layout.device)

    def load(self, past: Any, prompt_len: int, start: torch.Tensor) -> None:
        load_cache(self.k, self.v, past, prompt_len)
        self.start.copy_(start)

    def stale(self) -> bool:
        """Whether the stepper must be rebuilt before use (what it prepared from the weights
        no longer matches them)."""
        return False

    def step(self, ids: torch.Tensor, t: int) -> torch.Tensor:
        tt = torch.tensor([t], dtype=torch.int64, device=self.layout.device)
        return reference_step(self.layout, ids, self.k, self.v, tt, self.start)

    def greedy(
        self, ids, t0: int, n: int, eos: torch.Tensor | None, pad: int, finished, block: int = 0
    ):
        """``n`` greedy tokens from slot ``t0`` fed ``ids``; ``(tokens (batch, steps), steps)``.
        While fewer than ``block`` steps ran, the ``eos`` ids are masked out of the argmax."""
        out = []
        for j in range(n):
            logits = self.step(ids, t0 + j)
            if eos is not None and j < block:
                logits = logits.index_fill(-1, eos, float("-inf"))
            nxt = logits.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            out.append(nxt)
            if eos is not None:
                finished = finished | torch.isin(nxt, eos)
                if bool(finished.all()):
                    break
            ids = nxt
        return torch.stack(out, 1), len(out)


class GraphStepper(Stepper):
    """``cuda_graph_decode``: the step (and the greedy loop body) replayed from CUDA graphs."""

    name = "cuda_graph_decode"

    @staticmethod
    def why_not(layout: DecoderLayout) -> str | None:
        if layout.device.type != "cuda":
            return f"the model is on {layout.device}; CUDA graphs need a CUDA device"
        return None

    def __init__(
        self, layout: DecoderLayout, batch: int, max_len: int, shared: dict | None = None
    ) -> None:
        super().__init__(layout, batch, max_len, shared)
        dev = layout.device
        self.ids = torch.zeros(batch, dtype=torch.int64, device=dev)
        # t (the slot), j (the token column) and step_no (steps of this call) advance
        # together once a token: views of one tensor, one add in the loop graph
        self._counters = torch.zeros(3, dtype=torch.int64, device=dev)
        self.t, self.j, self.step_no = self._counters[0:1], self._counters[1:2], self._counters[2:3]
        self.tokens = torch.zeros(batch, SYNC_EVERY, dtype=torch.int64, device=dev)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.eos = torch.full((8,), -1, dtype=torch.int64, device=dev)
        self.eos_mask = torch.zeros(layout.vocab, dtype=torch.bool, device=dev)
        self.block = torch.zeros(1, dtype=torch.int64, device=dev)  # eos masked below it
        self.pad = torch.zeros(1, dtype=torch.int64, device=dev)
        self._step_graph = self._loop_graph = None
        self._logits = None

    def _raw_step(self) -> torch.Tensor:
        return reference_step(self.layout, self.ids, self.k, self.v, self.t, self.start)

    def _tail_state(self) -> tuple[torch.Tensor, ...]:
        """The device tensors a token's bookkeeping reads and updates, in
        :func:`ryzen_opt.kernels.reference.greedy_tail`'s order after ``logits``."""
        return (
            self.eos_mask, self.step_no, self.block, self.finished, self.pad, self.eos,
            self.tokens, self.j, self.ids,
        )  # fmt: skip

    def _tail(self, logits: torch.Tensor) -> None:
        """The token's bookkeeping after the step (PyTorch kernels here)."""
        reference.greedy_tail(logits, *self._tail_state())

    def _loop_body(self) -> None:
        self._tail(self._raw_step())
        self._counters += 1

    def step(self, ids: torch.Tensor, t: int) -> torch.Tensor:
        if self._step_graph is None:
            self.t.fill_(t)
            self.ids.copy_(ids)
            # capture writes slot t twice with the same values: harmless (overwritten below)
            self._step_graph, self._logits = capture(self._raw_step, self.layout.device)
        self.ids.copy_(ids)
        self.t.fill_(t)
        self._step_graph.replay()
        return self._logits.clone()

    def greedy(
        self, ids, t0: int, n: int, eos: torch.Tensor | None, pad: int, finished, block: int = 0
    ):
        if eos is not None and eos.numel() > self.eos.numel():
            return super().greedy(ids, t0, n, eos, pad, finished, block)
        self.eos.fill_(-1)
        self.eos_mask.zero_()
        if eos is not None:
            self.eos[: eos.numel()].copy_(eos)
            self.eos_mask[eos] = True
        self.block.fill_(block)
        self.step_no.zero_()
        self.pad.fill_(pad)
        if self._loop_graph is None:
            self.ids.copy_(ids)
            self.t.fill_(t0)
            self.j.zero_()
            self.finished.zero_()
            # warm-up and capture advance j, t, step_no and finished: reset below
            self._loop_graph, _ = capture(self._loop_body, self.layout.device)
        self.step_no.zero_()
        self.ids.copy_(ids)
        self.t.fill_(t0)
        self.finished.copy_(finished)
        chunks, done = [], 0
        while done < n:
            m = min(SYNC_EVERY, n - done)
            self.j.zero_()
            for _ in range(m):
                self._loop_graph.replay()
            chunks.append(self.tokens[:, :m].clone())
            done += m
            if eos is not None and bool(self.finished.all()):
                break
        tokens = torch.cat(chunks, 1)
        if eos is not None:  # trim after the step where the last row finished, as HF stops
            fin = torch.isin(tokens, eos) | finished[:, None]
            ever = fin.cummax(1).values.all(0)
            if bool(ever.any()):
                steps = int(ever.nonzero()[0, 0]) + 1
                return tokens[:, :steps], steps
        return tokens, tokens.shape[1]


class TritonGraphStepper(GraphStepper):
    """``triton_graph_decode``: the graph over :mod:`ryzen_opt.kernels.triton.decoder_step`."""

    name = "triton_graph_decode"

    @staticmethod
    def why_not(layout: DecoderLayout) -> str | None:
        reason = GraphStepper.why_not(layout)
        if reason is not None:
            return reason
        try:
            from ryzen_opt.kernels.triton import decoder_step
        except Exception as e:  # triton missing or broken: the reason goes into the report
            return f"triton decoder step unavailable: {type(e).__name__}: {e}"
        return decoder_step.supports(layout)

    def __init__(
        self, layout: DecoderLayout, batch: int, max_len: int, shared: dict | None = None
    ) -> None:
        super().__init__(layout, batch, max_len, shared)
        from ryzen_opt.kernels.triton.decoder_step import DecoderWorkspace
        from ryzen_opt.kernels.triton.greedy_tail import tail_scratch

        self.ws = DecoderWorkspace(layout, batch)
        self._tail_scratch = tail_scratch(batch, layout.device)

    def _raw_step(self) -> torch.Tensor:
        from ryzen_opt.kernels.triton.decoder_step import decoder_step

        return decoder_step(self.layout, self.ids, self.k, self.v, self.t, self.start, self.ws)

    def _tail(self, logits: torch.Tensor) -> None:
        """The token's bookkeeping in one Triton launch (about ten PyTorch kernels else)."""
        from ryzen_opt.kernels.triton.greedy_tail import greedy_tail

        greedy_tail(logits, *self._tail_state(), scratch=self._tail_scratch)


class NumbaStepper(Stepper):
    """``numba_decoder[fp32]`` / ``numba_decoder[int8]``: the step and the greedy loop in one
    Numba call each (:class:`ryzen_opt.kernels.numba.decoder_step.NumbaDecoder`). The
    decoder (and, for int8, its quantised weights) is built once per layout and shared by
    every batch size's stepper."""

    weights = "fp32"

    @classmethod
    def why_not(cls, layout: DecoderLayout) -> str | None:
        if layout.device.type != "cpu":
            return f"the model is on {layout.device}; the Numba decoder runs on the CPU"
        try:
            from ryzen_opt.kernels.numba import decoder_step
        except Exception as e:  # numba missing or broken: the reason goes into the report
            return f"numba decoder step unavailable: {type(e).__name__}: {e}"
        return decoder_step.supports(layout, cls.weights)

    def __init__(
        self, layout: DecoderLayout, batch: int, max_len: int, shared: dict | None = None
    ) -> None:
        super().__init__(layout, batch, max_len, shared)
        from ryzen_opt.kernels.numba.decoder_step import NumbaDecoder

        key = ("numba_decoder", self.weights)
        dec = self.shared.get(key)
        if dec is None or dec.layout is not layout or not dec.current():
            dec = self.shared[key] = NumbaDecoder(layout, weights=self.weights)
        self.dec = dec
        self.kn, self.vn = self.k.numpy(), self.v.numpy()

    def stale(self) -> bool:
        return not self.dec.current()

    def step(self, ids: torch.Tensor, t: int) -> torch.Tensor:
        out = self.dec.step(ids.numpy(), self.kn, self.vn, t, self.start.numpy())
        return torch.from_numpy(out)

    def greedy(
        self, ids, t0: int, n: int, eos: torch.Tensor | None, pad: int, finished, block: int = 0
    ):
        eos_ids = () if eos is None else [int(e) for e in eos.tolist()]
        tokens, steps = self.dec.greedy(
            ids.numpy(),
            self.kn,
            self.vn,
            t0,
            self.start.numpy(),
            n,
            eos_ids,
            pad,
            finished.numpy(),
            block if eos is not None else 0,
        )
        return torch.from_numpy(tokens[:, :steps]), steps


class NumbaInt8Stepper(NumbaStepper):
    name = "numba_decoder[int8]"
    weights = "int8"


class NumbaBf16Stepper(NumbaStepper):
    """bf16 weights: offered where the CPU has AVX512-BF16, as the project's CPU policy says
    (the widening kernel itself runs anywhere; on other CPUs the path is named with why)."""

    name = "numba_decoder[bf16]"
    weights = "bf16"

    @classmethod
    def why_not(cls, layout: DecoderLayout) -> str | None:
        from ryzen_opt import cpu_info

        flags = cpu_info.cpu_flags()
        if flags is None or "avx512_bf16" not in flags:
            return (
                "bf16 weights are offered on CPUs with AVX512-BF16 only; this CPU has "
                f"{cpu_info.isa_from_flags(flags or ())}"
            )
        return super().why_not(layout)


NumbaStepper.name = "numba_decoder[fp32]"

PATHS: dict[str, Callable[..., Stepper]] = {
    Stepper.name: Stepper,
    GraphStepper.name: GraphStepper,
    TritonGraphStepper.name: TritonGraphStepper,
    NumbaStepper.name: NumbaStepper,
    NumbaInt8Stepper.name: NumbaInt8Stepper,
    NumbaBf16Stepper.name: NumbaBf16Stepper,
}


def register(name: str, factory: Callable[..., Stepper]) -> None:
    """Add a path (the Numba module registers its own when it imports)."""
    PATHS[name] = factory


def why_not(name: str, layout: DecoderLayout) -> str | None:
    if name not in PATHS:
        return f"unknown decoder path {name!r} (known: {', '.join(sorted(PATHS))})"
    return PATHS[name].why_not(layout)
