"""Where the Triton decoder step's time goes, and which tiles make it faster (CUDA).

    python -m bench.decoder_step_tune [--model llama-1b] [--batches 1,16] [--t-max 256]
                                      [--loop] [--sweep] [--budget-s 420] [-o out.json]

For each batch size, on the benchmark's model shape (``bench.hf_decode.build_model``: random
weights, seed 0) in the model dtype (bf16), the whole one-token step of
:func:`ryzen_opt.kernels.triton.decoder_step.decoder_step` is captured in a CUDA graph, as
``optimize()`` runs it, and replayed with a cache of ``--t-max`` slots (the last one written,
every slot attended):

* ``step``: microseconds a replay (CUDA events over 50 replays, median of 5), tokens/s and
  the fraction of the copy bandwidth reached (weight bytes per step / step time); the same
  with programmatic dependent launch (an option, off by default) and whether its logits are
  identical;
* ``kernels``: the profiler's time per kernel kind (qkv, attention, o, up, down, head),
  summed over the layers, with the bytes each kind reads and the bandwidth that is;
* ``--loop``: the greedy decode loop as ``generate`` runs it
  (:class:`~ryzen_opt.optimization.fastpaths.decoder.TritonGraphStepper`, a prompt of
  ``--t-max / 2`` slots and ``--t-max / 2`` new tokens, eos ids masked as ``min_new_tokens``
  does): microseconds a token of the step graph alone, of the loop graph (the step with its
  argmax and eos/pad bookkeeping) replayed back to back, and of ``greedy()`` (host loop,
  syncs and the result's assembly included); and the profiler's GPU time a token per kernel
  outside the step, with the GPU's idle time: where a token's time goes besides the weights.
* ``--sweep``: coordinate descent over each kind's tiles (``block_n``, ``block_k``,
  ``split_k``, warps, stages; the attention's ``block_t``, splits and warps), one parameter at
  a time from the current choice, timing the whole step each time (the graph replay), until
  ``--budget-s`` is spent. Printed: every candidate's step time, and the best per kind.

The sweep is how :func:`~ryzen_opt.kernels.triton.decoder_step._config`'s rules are checked;
its results go under ``bench/results/<gpu>/`` with the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import device_name, environment, markdown_table, write_json
from bench.hf_decode import MODELS, build_model, copy_bandwidth, weight_bytes

KINDS = ("qkv", "attention", "o", "up", "down", "head")


def _layout(model):
    from ryzen_opt.optimization import families

    fam, reason = families.find(model)
    if fam is None or reason is not None:
        raise SystemExit(f"model: no decoder family serves it ({reason})")
    return fam.layout(model)


def _kind_of(lay, n: int, k: int, accumulators: int) -> str:
    qd, kvd = lay.heads * lay.head_dim, lay.kv_heads * lay.head_dim
    if n == qd + 2 * kvd and k == lay.hidden:
        return "qkv"
    if n == lay.vocab and k == lay.hidden:
        return "head"
    if k == lay.intermediate:
        return "down"
    if n == lay.intermediate:
        return "up"
    return "o"


class Bench:
    """One batch size's inputs and a step timer for given tile overrides."""

    def __init__(self, lay, batch: int, t_max: int) -> None:
        from ryzen_opt.kernels.triton import decoder_step as ds

        self.ds, self.lay, self.batch, self.t_max = ds, lay, batch, t_max
        g = torch.Generator(device="cuda").manual_seed(2)
        shape = (lay.num_layers, batch, lay.kv_heads, t_max, lay.head_dim)
        self.kc = (torch.randn(shape, device="cuda", generator=g) * 0.5).to(lay.dtype)
        self.vc = (torch.randn(shape, device="cuda", generator=g) * 0.5).to(lay.dtype)
        self.ids = torch.randint(0, lay.vocab, (batch,), device="cuda", generator=g)
        self.t = torch.tensor([t_max - 1], device="cuda")
        self.start = torch.zeros(batch, dtype=torch.int64, device="cuda")

    def chosen(self, over: dict[str, Any]) -> dict[str, Any]:
        """The tiles every kind gets with ``over`` applied to the default rules."""
        ws = self.workspace(over)
        out = {name: dataclasses.asdict(c) for name, c in ws.cfg.items()}
        out["attention"] = dataclasses.asdict(ws.bind(self.t_max))
        return out

    def workspace(self, over: dict[str, Any], pdl: bool = False):
        ds, lay = self.ds, self.lay

        def config(n, k, batch, *, accumulators=1, **kw):
            c = ds._config(n, k, batch, accumulators=accumulators, **kw)
            return over.get(_kind_of(lay, n, k, accumulators), c)

        def attn_config(batch, kv_heads, head_dim, t_max, **kw):
            c = ds._attn_config(batch, kv_heads, head_dim, t_max, **kw)
            return over.get("attention", c) if t_max else c

        return ds.DecoderWorkspace(lay, self.batch, config=config, attn_config=attn_config, pdl=pdl)

    def graph(self, over: dict[str, Any], pdl: bool = False):
        ws = self.workspace(over, pdl)

        def step():
            return self.ds.decoder_step(
                self.lay, self.ids, self.kc, self.vc, self.t, self.start, ws
            )

        step()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
        return g, ws

    def time_us(self, over: dict[str, Any], pdl: bool = False) -> float:
        g, _ = self.graph(over, pdl)
        samples = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(50):
                g.replay()
            b.record()
            torch.cuda.synchronize()
            samples.append(a.elapsed_time(b) * 1e3 / 50)
        return statistics.median(samples)

    def logits(self, over: dict[str, Any], pdl: bool = False, replays: int = 3):
        """The step's logits after ``replays`` graph replays (a race between launches shows
        as a difference between PDL on and off)."""
        g, ws = self.graph(over, pdl)
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
        return ws.logits.clone()

    def profile(self, over: dict[str, Any]) -> dict[str, float]:
        """Microseconds a step per kernel kind (the profiler's kernel records, in launch
        order: five a layer, then the head)."""
        from torch.profiler import ProfilerActivity, profile

        g, _ = self.graph(over)
        reps = 5
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                g.replay()
            torch.cuda.synchronize()
        kernels = [
            e
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and "kernel" in e.name
        ]
        kernels.sort(key=lambda e: e.time_range.start)
        per_step = 5 * self.lay.num_layers + 1
        if len(kernels) != reps * per_step:
            return {"unmapped_kernels": float(len(kernels))}
        out = dict.fromkeys(KINDS, 0.0)
        for i, e in enumerate(kernels):
            j = i % per_step
            kind = "head" if j == per_step - 1 else ("qkv", "attention", "o", "up", "down")[j % 5]
            out[kind] += e.time_range.elapsed_us() / reps
        return out


def _events_us(fn, reps: int) -> float:
    """Microseconds a call of ``fn`` over ``reps`` back-to-back calls (CUDA events)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps


def loop_profile(lay, batch: int, t_max: int) -> dict[str, Any]:
    """Where a greedy token's time goes in the loop ``generate`` runs (see ``--loop``)."""
    from torch.profiler import ProfilerActivity, profile

    from ryzen_opt.optimization.fastpaths.decoder import TritonGraphStepper

    prompt = t_max // 2
    n = t_max - prompt - 1
    st = TritonGraphStepper(lay, batch, t_max)
    g = torch.Generator(device="cuda").manual_seed(3)
    for c in (st.k, st.v):
        c.copy_(torch.randn(c.shape, device="cuda", generator=g) * 0.5)
    ids = torch.randint(0, lay.vocab, (batch,), device="cuda", generator=g)
    eos = torch.tensor([0], device="cuda")
    fin = torch.zeros(batch, dtype=torch.bool, device="cuda")

    def greedy():
        return st.greedy(ids, prompt, n, eos, 0, fin, n)

    greedy()  # captures the loop graph
    st.step(ids, prompt)  # captures the step graph
    torch.cuda.synchronize()
    out: dict[str, Any] = {"prompt": prompt, "tokens": n}

    def step_replay():
        st._step_graph.replay()

    def loop_replay():
        st._loop_graph.replay()

    samples: dict[str, list[float]] = {"step_graph": [], "loop_graph": [], "greedy": []}
    for _ in range(5):
        samples["step_graph"].append(_events_us(step_replay, n))
        st.t.fill_(prompt)
        st.j.zero_()
        # The loop graph writes tokens[:, j]: keep j inside the buffer.
        per = []
        for _ in range(n // 16):
            st.j.zero_()
            per.append(_events_us(loop_replay, 16))
        samples["loop_graph"].append(statistics.median(per))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        greedy()
        torch.cuda.synchronize()
        samples["greedy"].append((time.perf_counter() - t0) * 1e6 / n)
    out.update({f"{k}_us": statistics.median(v) for k, v in samples.items()})

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        greedy()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    other: dict[str, float] = {}
    for e in kernels:
        if any(k in e.name for k in ("_qkv_kernel", "_attention_kernel", "_linear_kernel")):
            continue  # the step's own kernels
        other[e.name[:80]] = other.get(e.name[:80], 0.0) + e.time_range.elapsed_us() / n
    out["gpu_busy_us_per_token"] = busy / n
    out["gpu_idle_us_per_token"] = (span - busy) / n
    out["other_kernels_us_per_token"] = dict(sorted(other.items(), key=lambda kv: -kv[1])[:12])
    return out


def kind_bytes(lay) -> dict[str, int]:
    """Weight bytes each kernel kind reads a step (all layers)."""

    def nbytes(lin):
        return lin.weight.numel() * lin.weight.element_size()

    layers = lay.layers
    out = {
        "qkv": sum(nbytes(ly.q) + nbytes(ly.k) + nbytes(ly.v) for ly in layers),
        "o": sum(nbytes(ly.o) for ly in layers),
        "up": sum(nbytes(ly.up) + (nbytes(ly.gate) if ly.gate is not None else 0) for ly in layers),
        "down": sum(nbytes(ly.down) for ly in layers),
        "head": nbytes(lay.head),
    }
    return out


def candidates(kind: str, base, lay, batch: int, t_max: int):
    """One-parameter moves from ``base``."""
    rep = dataclasses.replace
    if kind == "attention":
        for bt in (16, 32, 64):
            if bt != base.block_t and bt <= t_max:
                yield rep(base, block_t=bt)
        for sp in (1, 2, 4, 8, 16, 32):
            if sp != base.splits and sp * base.block_t <= t_max:
                yield rep(base, splits=sp)
        for w in (2, 4, 8):
            if w != base.num_warps:
                yield rep(base, num_warps=w)
        return
    divides = lay.head_dim if kind == "qkv" else None
    for bn in (1, 2, 4, 8, 16, 32, 64):
        if bn == base.block_n or (base.dot and bn < 16) or (divides and divides % bn):
            continue
        if kind == "qkv" and lay.rope_inv_freq is not None and bn < 2:
            continue
        yield rep(base, block_n=bn)
    for bk in (128, 256, 512, 1024, 2048):
        if bk != base.block_k:
            yield rep(base, block_k=bk)
    for sk in (1, 2, 4, 8):
        if sk != base.split_k:
            yield rep(base, split_k=sk)
    for w in (2, 4, 8):
        if w != base.num_warps:
            yield rep(base, num_warps=w)
    for st in (1, 2, 4):
        if st != base.num_stages:
            yield rep(base, num_stages=st)


def _config_of(kind: str, d: dict[str, Any], ds):
    cls = ds.AttnConfig if kind == "attention" else ds.LinearConfig
    return cls(**d)


SWEEP_ORDER = ("up", "down", "qkv", "o", "head", "attention")


def sweep(bench: Bench, deadline: float, log, kinds=SWEEP_ORDER) -> dict[str, Any]:
    ds, lay = bench.ds, bench.lay
    best: dict[str, Any] = {}
    base_cfg = bench.chosen({})
    best_us = bench.time_us({})
    log(f"  default: {best_us:.1f} us")
    tried = [{"over": {}, "us": best_us}]
    for kind in kinds:
        improved = True
        while improved and time.perf_counter() < deadline:
            improved = False
            cur = best.get(kind, _config_of(kind, base_cfg[kind], ds))
            for cand in candidates(kind, cur, lay, bench.batch, bench.t_max):
                if time.perf_counter() > deadline:
                    break
                over = {**best, kind: cand}
                try:
                    us = bench.time_us(over)
                except Exception as e:  # a tile the kernel cannot build: recorded, skipped
                    log(f"  {kind} {cand}: failed: {type(e).__name__}: {str(e)[:120]}")
                    continue
                tried.append({"kind": kind, "config": dataclasses.asdict(cand), "us": us})
                if us < best_us * 0.99:
                    best_us, best[kind], improved = us, cand, True
                    log(f"  {kind} {cand}: {us:.1f} us  (best)")
                    break
    return {
        "best_us": best_us,
        "best": {k: dataclasses.asdict(v) for k, v in best.items()},
        "tried": tried,
    }


def markdown(data: dict[str, Any]) -> str:
    """The run as markdown: step time per batch, time per kernel kind, the sweep's best."""
    env = data["environment"]
    out = [
        f"# Triton decoder step, {data['model']} on {env.get('gpu', data['device'])}\n",
        f"`{data['command']}` at commit {env.get('commit')}; torch {env['versions']['torch']}, "
        f"triton {env['versions']['triton']}; cache of {data['t_max']} slots; copy bandwidth "
        f"{data['copy_bandwidth_Bps'] / 1e12:.2f} TB/s; weights "
        f"{data['weight_bytes'] / 1e9:.2f} GB.\n\n",
    ]
    rows = []
    for b, e in data["batches"].items():
        row = [
            b,
            f"{e['step_us']:.1f}",
            f"{e['tokens_per_s']:,.0f}",
            f"{e['bandwidth_fraction']:.0%}",
        ]
        pdl = e.get("step_us_with_pdl")
        row.append("-" if pdl is None else f"{pdl:.1f} (same logits: {e['pdl_logits_equal']})")
        sw = e.get("sweep")
        row.append("-" if sw is None else f"{sw['best_us']:.1f}")
        rows.append(row)
    out.append(
        markdown_table(
            ["batch", "step us", "tokens/s", "% of copy BW", "with PDL, us", "sweep best, us"], rows
        )
    )
    for b, e in data["batches"].items():
        gbps = e.get("kernels_GBps", {})
        out.append(f"\nBatch {b}, microseconds a step per kernel kind (profiler):\n\n")
        out.append(
            markdown_table(
                ["kind", "us", "GB/s"],
                [
                    [k, f"{v:.1f}", f"{gbps[k]:.0f}" if k in gbps else "-"]
                    for k, v in e["kernels_us"].items()
                ],
            )
        )
        lp = e.get("loop")
        if lp:
            out.append(
                f"\nBatch {b}, the greedy loop ({lp['tokens']} tokens after {lp['prompt']} "
                f"slots), microseconds a token: step graph {lp['step_graph_us']:.1f}, loop "
                f"graph {lp['loop_graph_us']:.1f}, greedy() {lp['greedy_us']:.1f}; GPU busy "
                f"{lp['gpu_busy_us_per_token']:.1f}, idle {lp['gpu_idle_us_per_token']:.1f}. "
                "Kernels outside the step, us a token:\n\n"
            )
            out.append(
                markdown_table(
                    ["kernel", "us"],
                    [[k, f"{v:.2f}"] for k, v in lp["other_kernels_us_per_token"].items()],
                )
            )
        if "sweep" in e:
            out.append(f"\nSweep best tiles at batch {b}: `{e['sweep']['best']}`\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b", choices=sorted(MODELS))
    p.add_argument("--batches", default="1,16")
    p.add_argument("--t-max", type=int, default=256)
    p.add_argument("--loop", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument(
        "--sweep-kinds",
        default=",".join(SWEEP_ORDER),
        help="the kernel kinds the sweep moves, in order (default: %(default)s)",
    )
    p.add_argument("-o", "--output", type=Path, default=None)
    args = p.parse_args(argv)
    kinds = tuple(args.sweep_kinds.split(","))
    if not set(kinds) <= set(SWEEP_ORDER):
        p.error(f"--sweep-kinds: kinds are {','.join(SWEEP_ORDER)}, got {args.sweep_kinds}")
    if not torch.cuda.is_available():
        print("bench.decoder_step_tune needs CUDA", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model = build_model(args.model, "cuda", torch.bfloat16)
    lay = _layout(model)
    wbytes = weight_bytes(model)
    bw = copy_bandwidth("cuda")
    kb = kind_bytes(lay)
    data: dict[str, Any] = {
        "command": "python -m bench.decoder_step_tune " + " ".join(argv or sys.argv[1:]),
        "device": device_name("cuda"),
        "environment": environment("cuda"),
        "model": args.model,
        "weight_bytes": wbytes,
        "copy_bandwidth_Bps": bw,
        "t_max": args.t_max,
        "batches": {},
    }
    batches = [int(b) for b in args.batches.split(",")]

    def save():
        if args.output is not None:
            write_json(args.output, data)
            args.output.with_suffix(".md").write_text(markdown(data))

    for i, b in enumerate(batches):
        bench = Bench(lay, b, args.t_max)
        us = bench.time_us({})
        entry: dict[str, Any] = {
            "step_us": us,
            # The same step with programmatic dependent launch (off by default), and whether
            # it computes the same logits (a race between launches would show here).
            "step_us_with_pdl": bench.time_us({}, pdl=True),
            "pdl_logits_equal": bool(torch.equal(bench.logits({}, True), bench.logits({}, False))),
            "tokens_per_s": b * 1e6 / us,
            "bandwidth_fraction": wbytes / (us * 1e-6) / bw,
            "tiles": bench.chosen({}),
        }
        prof = bench.profile({})
        entry["kernels_us"] = prof
        entry["kernels_GBps"] = {k: kb[k] / (prof[k] * 1e-6) / 1e9 for k in kb if prof.get(k)}
        data["batches"][str(b)] = entry
        print(
            f"batch {b}: {us:.1f} us a step, {b * 1e6 / us:.0f} tok/s, "
            f"{entry['bandwidth_fraction']:.0%} of {bw / 1e12:.2f} TB/s; "
            f"with programmatic dependent launch {entry['step_us_with_pdl']:.1f} us "
            f"(same logits: {entry['pdl_logits_equal']})"
        )
        for k, v in prof.items():
            gbps = entry["kernels_GBps"].get(k)
            print(f"  {k:10s} {v:8.1f} us" + (f"  {gbps:7.0f} GB/s" if gbps else ""))
        if args.loop:
            entry["loop"] = lp = loop_profile(lay, b, args.t_max)
            print(
                f"  loop: step graph {lp['step_graph_us']:.1f} us, loop graph "
                f"{lp['loop_graph_us']:.1f} us, greedy() {lp['greedy_us']:.1f} us a token; GPU "
                f"busy {lp['gpu_busy_us_per_token']:.1f}, idle {lp['gpu_idle_us_per_token']:.1f}"
            )
            for k, v in lp["other_kernels_us_per_token"].items():
                print(f"    {v:7.2f} us  {k}")
        save()
        if args.sweep:
            left = args.budget_s - (time.perf_counter() - t0)
            deadline = time.perf_counter() + left / (len(batches) - i)
            entry["sweep"] = sweep(bench, deadline, print, kinds)
            best = {k: _config_of(k, v, bench.ds) for k, v in entry["sweep"]["best"].items()}
            entry["sweep"]["best_kernels_us"] = bench.profile(best)
            print(f"  best: {entry['sweep']['best_us']:.1f} us; {entry['sweep']['best']}")
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
