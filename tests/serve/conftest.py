"""A live server for the HTTP API tests: uvicorn on a free loopback port, in a thread."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "checkpoints" / "default"
MUL2 = ROOT / "checkpoints" / "lora_mul2"


class LiveServer:
    """``app`` served by uvicorn on 127.0.0.1 at a free port, until :meth:`stop`."""

    def __init__(self, app) -> None:
        import httpx
        import uvicorn

        from ryzen_opt.cli import _listen_socket

        sock = _listen_socket("127.0.0.1", 0)  # the socket ryzen-opt serve listens on
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(15)


@contextlib.contextmanager
def live(app) -> Iterator[LiveServer]:
    server = LiveServer(app)
    try:
        yield server
    finally:
        server.stop()


def sse_events(lines) -> list[tuple[str, dict]]:
    """``(event, data)`` pairs of a server-sent event stream given as text lines."""
    out, event = [], None
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[len("data: ") :])))
    return out
