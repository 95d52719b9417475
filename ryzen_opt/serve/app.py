"""``create_app``: the HTTP API over an :class:`~ryzen_opt.adapters.AdapterRegistry`.

Endpoints::

    POST /adapters/generate   {"description": str, "seed": int}  -> adapter id and metadata
    GET  /adapters                                              -> every served adapter
    POST /generate            {"prompt": str, "adapter": id | "auto" | null,
                               "description": str, "n": int, "stream": bool, ...}
    GET  /health                                                -> worker state, counters

Concurrency. The registry serves one adapter at a time over one model (activating an
adapter changes what every layer computes), so the model and the registry are touched only
by one thread, a :class:`~ryzen_opt.serve.worker.ModelWorker`: each request becomes one job
(route, switch, generate) that runs start to finish before the next one starts, in arrival
order. A streamed request is one job too: its tokens go to the client through a queue while
the job holds the worker, so no other adapter can be switched in under it. The event loop
itself only parses, validates and waits, so requests keep being accepted (and rejected with
a 4xx) while the model is busy. The adapter generator runs on its own thread, one call at a
time, outside the model worker; only registering its result is a (priority) model job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ryzen_opt.serve.config import (
    AdapterFactory,
    HTTPError,
    ServeConfig,
    SkillRouter,
    WeightExperts,
    default_scaling_engine,
)
from ryzen_opt.serve.schemas import (
    AdapterGenerateRequest,
    AdapterGenerateResponse,
    AdapterList,
    GenerateRequest,
    GenerateResponse,
)
from ryzen_opt.serve.service import Service


def create_app(
    registry,
    tokenizer,
    *,
    adapter_factory: AdapterFactory | Callable[[str, int], Path] | None = None,
    skill_router: SkillRouter | Callable[[str], str | None] | None = None,
    experts: WeightExperts | None = None,
    scaling_engine=None,
    adapters: Mapping[str, str | Path] | None = None,
    config: ServeConfig | None = None,
):
    """The FastAPI application serving ``registry`` over HTTP.

    Args:
        registry: an :class:`~ryzen_opt.adapters.AdapterRegistry`. From now on only the app
            touches it (on its model worker thread). Only adapters the app registered are
            served (404 for others): pass them as ``adapters``.
        tokenizer: text <-> ids, with ``encode(text) -> ids`` (BOS first), ``decode(ids)``
            and ``EOS`` (:class:`~ryzen_opt.models.tasks.CharTokenizer`).
        adapter_factory: ``factory(description, seed) -> folder`` of a new PEFT-format
            adapter (:class:`AdapterFactory`); ``None``: ``POST /adapters/generate`` and
            ``description`` requests answer 503.
        skill_router: ``router(prompt) -> adapter id or None`` for ``adapter="auto"``
            (:class:`SkillRouter`); ``None``: such requests answer 503 unless ``experts``.
        experts: weight experts for ``adapter="auto"`` instead of a router
            (:class:`WeightExperts`, e.g. :func:`ryzen_opt.serve.instant.svf_experts`): the
            prompt's expert is identified by a first pass and its weights serve the request.
        scaling_engine: the :class:`~ryzen_opt.scaling.InferenceScalingEngine` for ``n > 1``,
            over ``registry.model``; ``None``: :func:`default_scaling_engine`. Its sampler is
            replaced per request (temperature, top_k, seed).
        adapters: ``{id: folder}`` of PEFT-format adapters to register and list.
        config: limits (:class:`ServeConfig`).

    Returns:
        A ``fastapi.FastAPI``; its model worker starts and stops with the app's lifespan.
        ``app.state.service`` holds the state (counters for monitoring and tests).

    Raises:
        ValueError / TypeError naming the argument.

    Example:
        >>> # registry = AdapterRegistry(load_checkpoint("checkpoints/default"))
        >>> # app = create_app(registry, CharTokenizer(),
        >>> #                  adapters={"mul2": "checkpoints/lora_mul2"})
        >>> # uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    for name in ("register", "load", "activate", "deactivate", "generate", "generate_stream"):
        if not callable(getattr(registry, name, None)):
            raise TypeError(f"registry must be an AdapterRegistry (no {name} method)")
    if not isinstance(getattr(registry, "model", None), torch.nn.Module):
        raise TypeError("registry.model must be a torch.nn.Module")
    for name in ("encode", "decode"):
        if not callable(getattr(tokenizer, name, None)):
            raise TypeError(f"tokenizer must have an {name} method")
    if not isinstance(getattr(tokenizer, "EOS", None), int):
        raise TypeError("tokenizer must have an int EOS id")
    for name, fn in (("adapter_factory", adapter_factory), ("skill_router", skill_router)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
    if experts is not None:
        if skill_router is not None:
            raise ValueError("give skill_router or experts for adapter='auto', not both")
        for name in ("identify", "applied"):
            if not callable(getattr(experts, name, None)):
                raise TypeError(f"experts must have an {name} method (WeightExperts)")
    if scaling_engine is None:
        scaling_engine = default_scaling_engine(registry.model, tokenizer)
    elif getattr(scaling_engine, "model", None) is not registry.model:
        raise ValueError(
            "scaling_engine must run registry.model (its adapters are switched by the registry)"
        )
    config = ServeConfig() if config is None else config
    if not isinstance(config, ServeConfig):
        raise TypeError(f"config must be a ServeConfig, got {type(config).__name__}")
    service = Service(
        registry, tokenizer, adapter_factory, skill_router, scaling_engine, config, experts
    )
    for name, folder in (adapters or {}).items():
        service.add_folder(name, Path(folder))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.worker.start()
        try:
            yield
        finally:
            service.worker.stop()

    app = FastAPI(
        title="ryzen_opt",
        summary="LoRA adapters over one base model: generate adapters, generate text",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # logged by uvicorn as well
        return JSONResponse(
            {"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        parts = []
        for e in errors:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            msg = e.get("msg", "invalid")
            if e.get("type") == "json_invalid":
                msg = f"malformed JSON: {e.get('ctx', {}).get('error', msg)}"
                loc = ""
            parts.append(f"{loc}: {msg}" if loc else msg)
        errs = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors]
        return JSONResponse(
            {"detail": "; ".join(parts) or "invalid request", "errors": errs}, status_code=422
        )

    @app.get("/health")
    async def health() -> dict:
        w = service.worker
        return {
            "status": "ok" if w.running else "stopped",
            "queued": w.queued,
            "jobs_run": w.jobs_run,
            "streams_open": service.streams_open,
            "streams_cancelled": service.streams_cancelled,
        }

    @app.get("/adapters", response_model=AdapterList)
    async def list_adapters() -> AdapterList:
        return service.list()

    @app.post("/adapters/generate", response_model=AdapterGenerateResponse)
    async def generate_adapter(body: AdapterGenerateRequest) -> AdapterGenerateResponse:
        return await service.generate_adapter(body.description, body.seed)

    @app.post(
        "/generate",
        response_model=GenerateResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def generate(body: GenerateRequest):
        if body.stream:
            events = await service.stream(body)
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await service.generate(body)

    return app
