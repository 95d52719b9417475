"""The state behind the HTTP API's endpoints and the jobs they run on the model worker."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import torch

from ryzen_opt.serve.config import (
    AdapterFactory,
    HTTPError,
    ServeConfig,
    SkillRouter,
    WeightExperts,
)
from ryzen_opt.serve.schemas import (
    AUTO,
    EXPERT_PREFIX,
    AdapterGenerateResponse,
    AdapterInfo,
    AdapterList,
    BestOfN,
    CandidateInfo,
    GenerateRequest,
    GenerateResponse,
    Timing,
    check_description,
)
from ryzen_opt.serve.worker import PRIORITY_CONTROL, ModelWorker


def _adapter_info(name: str, folder: Path, **extra: Any) -> dict[str, Any]:
    from safetensors import safe_open

    from ryzen_opt.adapters import read_config

    cfg = read_config(folder)
    params = 0
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            params += n
    return dict(
        id=name,
        rank=cfg.rank,
        alpha=cfg.alpha,
        target_modules=list(cfg.target_modules),
        parameters=params,
        **extra,
    )


class Service:
    """State behind the endpoints; every model access goes through ``self.worker``.

    Internal to :func:`~ryzen_opt.serve.create_app` (``app.state.service``); its counters
    (``streams_open``, ``streams_cancelled``) show in ``GET /health``.
    """

    def __init__(
        self,
        registry,
        tokenizer,
        factory: AdapterFactory | None,
        router: SkillRouter | None,
        engine,
        config: ServeConfig,
        experts: WeightExperts | None = None,
    ) -> None:
        self.registry = registry
        self.tokenizer = tokenizer
        self.factory = factory
        self.router = router
        self.experts = experts
        self.engine = engine
        self.config = config
        self.worker = ModelWorker()
        self.max_seq_len = getattr(getattr(registry.model, "config", None), "max_seq_len", None)
        self._lock = threading.Lock()  # the catalog below
        self.catalog: dict[str, AdapterInfo] = {}
        self._by_description: dict[tuple[str, int], str] = {}
        self._factory_lock = threading.Lock()
        self._generated = 0
        self.streams_cancelled = 0
        self.streams_open = 0

    # -- adapters ----------------------------------------------------------------------------
    def add_folder(self, name: str, folder: Path) -> None:
        self.registry.register(name, folder)
        self.catalog[name] = AdapterInfo(**_adapter_info(name, Path(folder), source="folder"))

    def list(self) -> AdapterList:
        with self._lock:
            adapters = list(self.catalog.values())
        return AdapterList(
            adapters=adapters,
            generator=self.factory is not None,
            router=self.router is not None or self.experts is not None,
        )

    async def generate_adapter(self, description: str, seed: int) -> AdapterGenerateResponse:
        if self.factory is None:
            raise HTTPError(
                503,
                "no adapter generator is configured on this server: start it with one "
                "(create_app(adapter_factory=...), or ryzen-opt serve --adapter-factory "
                "MODULE:NAME)",
            )
        try:
            description = check_description(description, self.config.max_description_chars)
        except ValueError as e:
            raise HTTPError(422, str(e)) from None
        key = (description, seed)
        with self._lock:
            known = self._by_description.get(key)
            if known is not None:
                return AdapterGenerateResponse(**self.catalog[known].model_dump(), cached=True)
        folder, ms = await asyncio.to_thread(self._run_factory, description, seed)
        with self._lock:  # a concurrent request for the same key may have won the race
            known = self._by_description.get(key)
            if known is not None:
                return AdapterGenerateResponse(**self.catalog[known].model_dump(), cached=True)
            self._generated += 1
            tag = hashlib.blake2b(f"{seed}:{description}".encode(), digest_size=4).hexdigest()
            name = f"gen{self._generated}-{tag}"
        try:
            info = AdapterInfo(
                **_adapter_info(
                    name,
                    folder,
                    source="generated",
                    description=description,
                    seed=seed,
                    generate_ms=ms,
                )
            )
        except Exception as e:
            raise HTTPError(500, f"the adapter generator wrote an unusable adapter: {e}") from None

        def register() -> None:  # loading now turns a bad adapter into this request's error
            self.registry.register(name, folder)
            self.registry.load(name)

        try:
            await asyncio.wrap_future(self.worker.submit(register, PRIORITY_CONTROL))
        except Exception as e:  # the name stays registered but is never listed or served
            raise HTTPError(
                500, f"the generated adapter does not fit the served model: {e}"
            ) from None
        with self._lock:
            self.catalog[name] = info
            self._by_description[key] = name
        return AdapterGenerateResponse(**info.model_dump())

    def _run_factory(self, description: str, seed: int) -> tuple[Path, float]:
        with self._factory_lock:
            t0 = time.perf_counter()
            try:
                folder = self.factory(description, seed)
            except ValueError as e:
                raise HTTPError(422, f"description: {e}") from None
            except Exception as e:
                raise HTTPError(500, f"the adapter generator failed: {e!r}") from None
            ms = (time.perf_counter() - t0) * 1e3
        if not isinstance(folder, (str, Path)) or not Path(folder).is_dir():
            raise HTTPError(
                500, f"the adapter generator returned {folder!r}, not an adapter folder"
            )
        return Path(folder), ms

    # -- generation --------------------------------------------------------------------------
    def encode(self, req: GenerateRequest) -> tuple[list[int], int]:
        if not req.prompt:
            raise HTTPError(422, "prompt is empty")
        try:
            ids = list(self.tokenizer.encode(req.prompt))
        except (TypeError, ValueError) as e:
            raise HTTPError(422, f"prompt: {e}") from None
        asked = req.max_new_tokens
        new = self.config.default_max_new_tokens if asked is None else asked
        limit = self.max_seq_len
        if limit is not None and len(ids) + new > limit:
            if asked is None and len(ids) < limit:  # the default shrinks to fit a long prompt
                new = limit - len(ids)
            else:
                raise HTTPError(
                    422,
                    f"prompt ({len(ids)} tokens) + max_new_tokens ({new}) exceeds the "
                    f"model's max_seq_len={limit}",
                )
        if req.n > self.config.max_n:
            raise HTTPError(422, f"n must be <= {self.config.max_n}, got {req.n}")
        return ids, new

    async def resolve(self, req: GenerateRequest) -> str | None:
        """The adapter id to serve (``AUTO`` when the router decides on the worker)."""
        if req.description is not None:
            return (await self.generate_adapter(req.description, req.seed)).id
        if req.adapter is None:
            return None
        if req.adapter == AUTO:
            if self.router is None and self.experts is None:
                raise HTTPError(
                    503,
                    'adapter="auto" needs a skill router or weight experts and this server has '
                    "neither configured",
                )
            return AUTO
        with self._lock:
            if req.adapter not in self.catalog:
                raise HTTPError(
                    404, f"adapter {req.adapter!r} not found (GET /adapters lists them)"
                )
        return req.adapter

    def _route(self, name: str | None, prompt: str) -> str | None:
        """On the worker: the router's choice for ``AUTO``, checked; else ``name``."""
        if name != AUTO:
            return name
        chosen = self.router(prompt)
        if chosen is not None:
            with self._lock:
                known = chosen in self.catalog
            if not known:
                raise HTTPError(
                    500, f"the skill router chose {chosen!r}, which is not a served adapter"
                )
        return chosen

    @contextlib.contextmanager
    def _routed(self, name: str | None, prompt: str) -> Iterator[tuple[str | None, str | None]]:
        """On the worker, around a job: ``(adapter the registry serves, adapter shown)``.

        ``AUTO`` with weight experts: the base model (no adapter) holding the expert's
        weights for the job, shown as ``"expert:<name>"``; with a router: its choice."""
        if name != AUTO or self.experts is None:
            chosen = self._route(name, prompt)
            yield chosen, chosen
            return
        self.registry.deactivate()  # the first pass and the experts start from the base
        expert = self.experts.identify(prompt)
        with self.experts.applied(expert):
            yield None, f"{EXPERT_PREFIX}{expert}"

    def _sampling(self, req: GenerateRequest) -> dict[str, Any]:
        t = req.temperature if req.temperature is not None else (0.0 if req.n == 1 else 1.0)
        return {"temperature": t, "top_k": req.top_k if t > 0 else None, "seed": req.seed}

    def run(self, req: GenerateRequest, ids: list[int], new: int, name: str | None) -> dict:
        """On the worker: route, switch, generate; the response fields."""
        with self._routed(name, req.prompt) as (served, shown):
            fields = self._run(req, ids, new, served)
        return dict(fields, adapter=shown, routed=name == AUTO)

    def _run(self, req: GenerateRequest, ids: list[int], new: int, name: str | None) -> dict:
        eos = self.tokenizer.EOS
        s = self._sampling(req)
        best = None
        if req.n == 1:
            prompt = torch.tensor([ids])
            out = self.registry.generate(prompt, adapter=name, max_new_tokens=new, eos_id=eos, **s)
            toks = out[0, len(ids) :].tolist()
            if eos in toks:
                toks = toks[: toks.index(eos) + 1]
            completion, finish = self.tokenizer.decode(toks), "eos" if eos in toks else "length"
        else:
            if name is None:
                self.registry.deactivate()
            else:
                self.registry.activate(name)
            engine = copy.copy(self.engine)
            engine.sampler = self.engine.sampler.replace(
                temperature=s["temperature"], top_k=s["top_k"], seed=s["seed"], eos_id=eos
            )
            [r] = engine.best_of_n([ids], req.n, new, strategy=req.strategy)
            chosen = r.candidates[r.index]
            toks, completion = list(chosen.token_ids), r.completion
            finish = "eos" if chosen.eos else "length"
            best = BestOfN(
                strategy=r.strategy,
                index=r.index,
                candidates=[
                    CandidateInfo(
                        completion=c.completion, verified=c.verified, mean_logprob=c.mean_logprob
                    )
                    for c in r.candidates
                ],
            )
        return dict(
            prompt=req.prompt,
            completion=completion,
            token_ids=toks,
            finish_reason=finish,
            best_of=best,
        )

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        t0 = time.perf_counter()
        ids, new = self.encode(req)
        name = await self.resolve(req)
        marks: dict[str, float] = {}

        def job() -> dict:
            marks["start"] = time.perf_counter()
            try:
                return self.run(req, ids, new, name)
            finally:
                marks["end"] = time.perf_counter()

        t1 = time.perf_counter()
        try:
            fields = await asyncio.wrap_future(self.worker.submit(job))
        except Exception as e:
            raise _as_http(e) from None
        t2 = time.perf_counter()
        timing = Timing(
            queue_ms=(marks["start"] - t1) * 1e3,
            run_ms=(marks["end"] - marks["start"]) * 1e3,
            total_ms=(t2 - t0) * 1e3,
        )
        return GenerateResponse(**fields, timing=timing)

    async def stream(self, req: GenerateRequest) -> AsyncIterator[str]:
        """Start a streamed request: errors before the first token raise :class:`HTTPError`;
        the returned iterator yields the server-sent events."""
        ids, new = self.encode(req)
        name = await self.resolve(req)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def push(*item: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody reads on
                cancel.set()

        def job() -> None:
            if cancel.is_set():
                return
            try:
                with self._routed(name, req.prompt) as (served, shown):
                    stream_job(served, shown)
            except BaseException as e:  # routing failed (the stream job reports its own)
                push("error", e)

        def stream_job(served: str | None, chosen: str | None) -> None:
            gen = None
            try:
                gen = self.registry.generate_stream(
                    torch.tensor([ids]),
                    adapter=served,
                    max_new_tokens=new,
                    eos_id=self.tokenizer.EOS,
                    **self._sampling(req),
                )
                # the first step checks the settings: a refusal is still a plain HTTP error
                first = next(gen, None)
            except BaseException as e:
                if gen is not None:
                    gen.close()
                push("error", e)
                return
            push("start", chosen)
            count, finish = 0, "length"
            try:
                for tok in itertools.chain([] if first is None else [first], gen):
                    if cancel.is_set():
                        break
                    t = int(tok[0])
                    count += 1
                    if t == self.tokenizer.EOS:
                        finish = "eos"
                        break
                    push("token", t)
            except BaseException as e:
                push("error", e)
                return
            finally:
                gen.close()  # the registry allows adapter switches again
            push("done", count, finish)

        def failed(fut) -> None:  # the worker stopped before the job ran
            if fut.exception() is not None:
                push("error", fut.exception())

        self.worker.submit(job).add_done_callback(failed)
        kind, *rest = await items.get()
        if kind == "error":
            raise _as_http(rest[0])
        chosen = rest[0]
        return self._events(req, chosen, items, cancel)

    async def _events(
        self, req: GenerateRequest, chosen: str | None, items: asyncio.Queue, cancel
    ) -> AsyncIterator[str]:
        self.streams_open += 1
        text: list[str] = []
        finished = False
        try:
            yield _sse("start", {"adapter": chosen, "routed": req.adapter == AUTO})
            while True:
                kind, *rest = await items.get()
                if kind == "token":
                    piece = self.tokenizer.decode([rest[0]])
                    text.append(piece)
                    yield _sse("token", {"id": rest[0], "text": piece})
                elif kind == "done":
                    finished = True
                    yield _sse(
                        "done",
                        {
                            "adapter": chosen,
                            "completion": "".join(text),
                            "tokens": rest[0],
                            "finish_reason": rest[1],
                        },
                    )
                    return
                else:
                    finished = True
                    yield _sse("error", {"detail": f"generation failed: {rest[0]}"})
                    return
        finally:
            self.streams_open -= 1
            if not finished:  # the client went away: stop the job at its next token
                cancel.set()
                self.streams_cancelled += 1


def _as_http(e: BaseException) -> HTTPError:
    """The answer to an error raised while serving a request on the model worker."""
    from ryzen_opt.adapters import AdapterError

    if isinstance(e, HTTPError):
        return e
    if isinstance(e, AdapterError):  # a registered adapter that does not load: the server's
        return HTTPError(500, f"the adapter could not be served: {e}")
    if isinstance(e, (ValueError, TypeError)):  # generation refused the request's settings
        return HTTPError(422, str(e))
    return HTTPError(500, f"generation failed: {type(e).__name__}: {e}")


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
