"""bench.serve: a bounded load test of the HTTP API on loopback.

Starts ``ryzen-opt serve`` in its own process (the real command, on a free 127.0.0.1 port),
then:

1. ``POST /adapters/generate`` one request at a time on the idle server: the client's
   latency (p50/p99) and the generator's own time as the server reports it;
2. one pass over the request mix, one request at a time: the reference answer of each
   (adapter, prompt, stream, n) request;
3. ``--clients`` concurrent clients for ``--duration`` seconds, each sending the mix in a loop
   (plain, streamed and best-of-n ``/generate`` requests over the base model, lora_mul2 and
   two generated adapters, and now and then a new ``/adapters/generate``). Every answer is
   compared with its reference: a response with another adapter's output counts as wrong.
   A request still unanswered ``--timeout`` seconds after it was sent counts as lost, and so
   does a stream that ends without its ``done`` event. At the deadline a client stops sending
   and waits for the answer in flight, so every request is accounted for.

Without ``--adapter-factory`` the adapters come from the test-only hash generator
(``tests/serve/lora_factory.py``: a real PEFT adapter drawn from a hash of the description,
not a hypernetwork); the output says which generator ran. ``--instant`` serves the committed
instant adapters (``ryzen-opt serve --instant``: Text-to-LoRA generates the adapters, the SVF
experts answer ``adapter="auto"``, which then joins the mix).

    python -m bench.serve                      # 32 clients for 30 s
    python -m bench.serve --instant            # Text-to-LoRA and SVF experts
    python -m bench.serve --quick              # 4 clients for 3 s (the test runs this)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, environment, markdown_table, print_table, where, write_json
from ryzen_opt import cli

TEST_FACTORY = "tests.serve.lora_factory:HashLoraFactory"
PROMPTS = ("07*41=", "23*19=", "482+317=", "093-018=", "650+199=", "12*12=")


@dataclass
class Sample:
    """One request of the load phase."""

    kind: str
    latency_s: float
    status: int | None  # None: no response (lost)
    outcome: str  # ok | error | wrong | lost
    detail: str = ""


@dataclass
class Mix:
    """The load phase's request cycle and its reference answers."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def start_server(args) -> tuple[subprocess.Popen, str]:
    """``ryzen-opt serve`` in a child process; returns it and its base URL."""
    cmd = [sys.executable, "-m", "ryzen_opt.cli", "serve", "--port", "0"]
    cmd += ["--checkpoint", str(args.checkpoint), "--adapters", *map(str, args.adapters)]
    if args.instant:
        cmd += ["--instant"]
    else:
        cmd += ["--adapter-factory", args.adapter_factory or TEST_FACTORY]
    cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(180)
    m = re.search(r"on (http://127\.0\.0\.1:\d+) ", first[0]) if first else None
    if m is None:
        proc.kill()
        out = (first[0] if first else "") + (proc.stdout.read() or "")
        raise RuntimeError(f"the server did not start: {out.strip()[-2000:]}")
    # keep draining its output so a chatty server never blocks on a full pipe
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    return proc, m.group(1)


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


async def _call(client, req: dict[str, Any], timings: list | None = None) -> tuple[int, Any]:
    """Send one request; ``(status, answer)``, the answer comparable across calls. The server's
    own timing of an unstreamed ``/generate`` goes to ``timings``."""
    if req["path"] == "/adapters/generate":
        r = await client.post(req["path"], json=req["body"])
        return r.status_code, r.json()
    body = req["body"]
    if not body.get("stream"):
        r = await client.post("/generate", json=body)
        data = r.json()
        if r.status_code != 200:
            return r.status_code, data
        if timings is not None:
            timings.append(data["timing"])
        return 200, (data["adapter"], data["token_ids"], data["completion"])
    async with client.stream("POST", "/generate", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.json()
        ids, done, event = [], None, None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "token":
                    ids.append(data["id"])
                elif event in ("done", "error"):
                    done = (event, data)
        if done is None:
            raise ConnectionError("the stream ended without a done event")
        if done[0] == "error":
            return 500, done[1]
        return 200, (done[1]["adapter"], ids, done[1]["completion"])


def build_mix(
    gen_ids: list[str], folder_ids: list[str], auto: bool = False
) -> list[dict[str, Any]]:
    reqs = []
    adapters = [None, *folder_ids, *gen_ids, *(["auto"] if auto else [])]
    for i, prompt in enumerate(PROMPTS):
        for j, adapter in enumerate(adapters):
            body: dict[str, Any] = {"prompt": prompt, "adapter": adapter}
            k = i * len(adapters) + j
            if k % 4 == 1:
                body["stream"] = True
            elif k % 8 == 2:
                body.update(n=4, temperature=1.0, seed=k)
            kind = "stream" if body.get("stream") else "best_of_4" if "n" in body else "plain"
            reqs.append({"path": "/generate", "body": body, "kind": kind})
    return reqs


async def generate_adapters(client, count: int, tag: str) -> tuple[list[float], list[float], list]:
    lat, gen_ms, ids = [], [], []
    for i in range(count):
        body = {"description": f"{tag} {i}: add two {2 + i % 3}-digit numbers", "seed": i}
        t0 = time.perf_counter()
        r = await client.post("/adapters/generate", json=body)
        lat.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise RuntimeError(f"/adapters/generate answered {r.status_code}: {r.text}")
        gen_ms.append(r.json()["generate_ms"])
        ids.append(r.json()["id"])
    return lat, gen_ms, ids


async def load(url: str, mix: Mix, clients: int, duration: float, timeout: float, every: int):
    import httpx

    samples: list[Sample] = []
    timings: list[dict[str, float]] = []
    deadline = time.perf_counter() + duration
    counter = [0]

    async def client_loop(c: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
            i = c
            while time.perf_counter() < deadline:
                counter[0] += 1
                if every and counter[0] % every == 0:
                    req = {
                        "path": "/adapters/generate",
                        "body": {"description": f"load {c}-{i}: subtract two numbers"},
                        "kind": "adapters_generate",
                    }
                    want = None
                else:
                    req, want = (
                        mix.requests[i % len(mix.requests)],
                        mix.answers[i % len(mix.answers)],
                    )
                i += clients
                t0 = time.perf_counter()
                try:
                    status, got = await asyncio.wait_for(_call(client, req, timings), timeout)
                except Exception as e:  # no (complete) answer
                    samples.append(
                        Sample(req["kind"], time.perf_counter() - t0, None, "lost", repr(e))
                    )
                    continue
                dt = time.perf_counter() - t0
                if status != 200:
                    samples.append(Sample(req["kind"], dt, status, "error", str(got)[:200]))
                elif want is not None and got != want:
                    samples.append(Sample(req["kind"], dt, status, "wrong", f"{got} != {want}"))
                else:
                    samples.append(Sample(req["kind"], dt, status, "ok"))

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    return samples, timings, time.perf_counter() - t0


async def run(args) -> dict[str, Any]:
    import httpx

    proc, url = start_server(args)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as client:
            listed = (await client.get("/adapters")).json()
            folder_ids = [a["id"] for a in listed["adapters"]]
            await generate_adapters(client, 2, "warm-up")
            lat, gen_ms, _ = await generate_adapters(client, args.generate_requests, "idle")
            _, _, gen_ids = await generate_adapters(client, 2, "served")
            mix = Mix(requests=build_mix(gen_ids, folder_ids, auto=listed["router"]))
            for req in mix.requests:  # the reference answers: one request at a time
                status, answer = await _call(client, req)
                if status != 200:
                    raise RuntimeError(f"reference request {req} answered {status}: {answer}")
                mix.answers.append(answer)
            health0 = (await client.get("/health")).json()
        load_before = os.getloadavg()
        samples, timings, wall = await load(url, mix, args.clients, args.duration, args.timeout, 20)
        load_after = os.getloadavg()
        async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as client:
            health1 = (await client.get("/health")).json()
    finally:
        rc = stop_server(proc)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({s.kind for s in samples}):
        ks = [s for s in samples if s.kind == kind]
        ok = [s.latency_s for s in ks if s.outcome == "ok"]
        by_kind[kind] = {
            "requests": len(ks),
            "ok": len(ok),
            "p50_ms": _quantile(ok, 0.5) * 1e3,
            "p99_ms": _quantile(ok, 0.99) * 1e3,
        }
    ok_lat = [s.latency_s for s in samples if s.outcome == "ok"]
    count = {o: sum(s.outcome == o for s in samples) for o in ("ok", "error", "wrong", "lost")}
    return {
        "url": url,
        "server_threads": args.threads,
        "server_exit_status": rc,
        "adapter_generator": (
            "ryzen-opt serve --instant (Text-to-LoRA; SVF experts for adapter='auto')"
            if args.instant
            else args.adapter_factory
            or f"{TEST_FACTORY} (test-only hash generator, not a hypernetwork)"
        ),
        "adapters_generate_idle": {
            "requests": len(lat),
            "client_p50_ms": _quantile(lat, 0.5) * 1e3,
            "client_p99_ms": _quantile(lat, 0.99) * 1e3,
            "generator_p50_ms": _quantile(gen_ms, 0.5),
            "goal_p50_ms": 20.0,
        },
        "load": {
            "clients": args.clients,
            "duration_s": args.duration,
            "wall_s": wall,
            "requests": len(samples),
            **count,
            "throughput_rps": count["ok"] / wall,
            "p50_ms": _quantile(ok_lat, 0.5) * 1e3,
            "p99_ms": _quantile(ok_lat, 0.99) * 1e3,
            "by_kind": by_kind,
            "mix": [r["body"] for r in mix.requests],
            "first_failures": [s.__dict__ for s in samples if s.outcome != "ok"][:10],
            "server_jobs_run": health1["jobs_run"] - health0["jobs_run"],
            # the server's own timing of the unstreamed /generate requests: on the model
            # worker (run) and waiting for it (queue)
            "server_run_p50_ms": _quantile([t["run_ms"] for t in timings], 0.5),
            "server_queue_p50_ms": _quantile([t["queue_ms"] for t in timings], 0.5),
            "loadavg_1m_before_after": [load_before[0], load_after[0]],
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__)
    ap.add_argument("--clients", type=int, default=None, help="default 32 (--quick: 4)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of load (30; 3)")
    ap.add_argument(
        "--generate-requests", type=int, default=None, help="idle /adapters/generate (50; 5)"
    )
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a request is lost")
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="default checkpoints/default (with --instant: checkpoints/instant/base)",
    )
    ap.add_argument(
        "--adapters",
        nargs="*",
        type=Path,
        default=None,
        help="default checkpoints/lora_mul2 (with --instant: the task-LoRA library)",
    )
    ap.add_argument(
        "--adapter-factory",
        default=None,
        metavar="MODULE:NAME",
        help=f"the adapter generator builder (default: the test-only {TEST_FACTORY})",
    )
    ap.add_argument(
        "--instant",
        action="store_true",
        help="serve the committed Text-to-LoRA and SVF experts (ryzen-opt serve --instant)",
    )
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument(
        "--quick", action="store_true", help="defaults of 4 clients, 3 s, 5 generate requests"
    )
    ap.add_argument("--note", default="", help="recorded with the results (e.g. 'shared machine')")
    ap.add_argument("-o", "--output", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.instant and a.adapter_factory:
        ap.error("argument --instant: not with --adapter-factory (it names its own)")
    if a.checkpoint is None:  # the instant adapters belong to the base they were trained over
        a.checkpoint = ROOT / (cli.INSTANT_CHECKPOINT if a.instant else cli.SERVE_CHECKPOINT)
    if a.adapters is None:
        a.adapters = [ROOT / (cli.INSTANT_ADAPTERS if a.instant else cli.SERVE_ADAPTERS)]
    for name, full, quick in (
        ("clients", 32, 4),
        ("duration", 30.0, 3.0),
        ("generate_requests", 50, 5),
    ):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    for name in ("clients", "generate_requests", "threads"):
        if getattr(a, name) < 1:
            ap.error(f"argument --{name.replace('_', '-')}: must be >= 1")
    if not a.duration > 0 or not a.timeout > 0:
        ap.error("arguments --duration and --timeout must be > 0")
    res = asyncio.run(run(a))
    env = environment("cpu")
    env["command"] = shlex.join(
        ["python", "-m", "bench.serve", *(sys.argv[1:] if argv is None else argv)]
    )
    for mod in ("fastapi", "uvicorn", "httpx", "pydantic"):
        try:
            env["versions"][mod] = __import__(mod).__version__
        except Exception:
            env["versions"][mod] = "not installed"
    data = {"benchmark": "serve", "environment": env, "note": a.note, **res}
    out = a.output or RESULTS / "cpu" / "serve.json"
    write_json(out, data)
    g, ld = res["adapters_generate_idle"], res["load"]
    title = (
        f"bench.serve on {where(env)}: {ld['clients']} clients for {ld['duration_s']:g} s, "
        f"server torch threads {a.threads}"
    )
    rows = [
        ["requests answered / sent", f"{ld['ok']} / {ld['requests']}"],
        ["errors (non-200)", ld["error"]],
        ["wrong answers (not the sequential answer)", ld["wrong"]],
        ["lost (no complete answer)", ld["lost"]],
        ["throughput", f"{ld['throughput_rps']:.1f} requests/s"],
        ["latency p50 / p99", f"{ld['p50_ms']:.1f} / {ld['p99_ms']:.1f} ms"],
        [
            "  server side (unstreamed): on the model / queued, p50",
            f"{ld['server_run_p50_ms']:.1f} / {ld['server_queue_p50_ms']:.1f} ms",
        ],
    ]
    rows += [
        [f"  {k}: p50 / p99 ({v['ok']} answered)", f"{v['p50_ms']:.1f} / {v['p99_ms']:.1f} ms"]
        for k, v in ld["by_kind"].items()
    ]
    rows += [
        [
            f"/adapters/generate, idle, p50 / p99 ({g['requests']} requests)",
            f"{g['client_p50_ms']:.2f} / {g['client_p99_ms']:.2f} ms (goal p50 <= 20 ms: "
            f"{'met' if g['client_p50_ms'] <= 20 else 'missed'})",
        ],
        ["  of which the generator (p50)", f"{g['generator_p50_ms']:.2f} ms"],
        ["adapter generator", res["adapter_generator"]],
        [
            "1-min load average before / after",
            "{:.2f} / {:.2f}".format(*ld["loadavg_1m_before_after"]),
        ],
    ]
    print_table(title, ["", "value"], rows)
    md = [f"# bench.serve\n\n{title}\n", f"`{env['command']}` at {env['commit']}"]
    if a.note:
        md.append(f"Note: {a.note}")
    md.append(markdown_table(["", "value"], rows))
    out.with_suffix(".md").write_text("\n\n".join(md))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if ld["error"] == ld["wrong"] == ld["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
