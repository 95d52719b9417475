"""The HTTP API: generate adapters from descriptions, generate text with any served adapter.

Public names::

    from ryzen_opt.serve import create_app, ServeConfig, AdapterFactory, SkillRouter

Needs the ``serve`` extra (``pip install 'ryzen-opt[serve]'``: FastAPI, uvicorn, httpx).
``ryzen-opt serve`` starts it on 127.0.0.1.
"""

from ryzen_opt.serve.app import create_app
from ryzen_opt.serve.config import (
    AdapterFactory,
    ServeConfig,
    SkillRouter,
    arithmetic_verify,
    default_scaling_engine,
)
from ryzen_opt.serve.worker import ModelWorker

__all__ = [
    "AdapterFactory",
    "ModelWorker",
    "ServeConfig",
    "SkillRouter",
    "arithmetic_verify",
    "create_app",
    "default_scaling_engine",
]
