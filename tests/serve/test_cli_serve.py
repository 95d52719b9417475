"""``ryzen-opt serve``: the real command on a free port, its options and usage errors."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading

import pytest

httpx = pytest.importorskip("httpx", reason="needs the 'serve' extra")
pytest.importorskip("fastapi", reason="needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="needs the 'serve' extra")

import torch  # noqa: E402

from ryzen_opt.adapters import AdapterRegistry  # noqa: E402
from ryzen_opt.cli import build_parser, build_serve_app, main  # noqa: E402
from ryzen_opt.models import load_checkpoint  # noqa: E402
from ryzen_opt.models.tasks import CharTokenizer  # noqa: E402
from tests.serve.conftest import CHECKPOINT, MUL2, ROOT, live  # noqa: E402

TOK = CharTokenizer()


def test_serve_command_listens_on_loopback_with_the_default_checkpoint_and_lora_mul2():
    proc = subprocess.Popen(
        [sys.executable, "-m", "ryzen_opt.cli", "serve", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()))
        reader.start()
        reader.join(120)
        assert first, "no start-up line within 120 s"
        m = re.search(r"on (http://127\.0\.0\.1:\d+) ", first[0])
        assert m, first[0]
        assert "adapters: lora_mul2" in first[0] and "adapter generator: none" in first[0]
        with httpx.Client(base_url=m.group(1), timeout=30) as c:
            listed = c.get("/adapters").json()
            assert [a["id"] for a in listed["adapters"]] == ["lora_mul2"]
            assert listed["adapters"][0]["rank"] == 16 and listed["generator"] is False
            r = c.post("/adapters/generate", json={"description": "multiply two numbers"})
            assert r.status_code == 503 and "no adapter generator" in r.json()["detail"]
            r = c.post("/generate", json={"prompt": "07*41=", "adapter": "lora_mul2"})
            assert r.status_code == 200
        ref = AdapterRegistry(load_checkpoint(CHECKPOINT))
        ref.register("lora_mul2", MUL2)
        ids = torch.tensor([TOK.encode("07*41=")])
        out = ref.generate(ids, adapter="lora_mul2", max_new_tokens=16, eos_id=TOK.EOS)
        assert r.json()["completion"] == TOK.decode(out[0, ids.shape[1] :])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stdout.read()


def multiplication_router(registry, workdir):
    """A ``--skill-router`` builder: multiplication prompts go to adapter ``mul``."""
    assert registry.model is not None and workdir.is_dir()
    return lambda prompt: "mul" if "*" in prompt else None


def test_adapter_factory_and_skill_router_options_wire_them_in(tmp_path):
    args = build_parser().parse_args(
        [
            "serve",
            "--checkpoint",
            str(CHECKPOINT),
            "--adapters",
            f"mul={MUL2}",
            "--adapter-factory",
            "tests.serve.lora_factory:HashLoraFactory",
            "--skill-router",
            "tests.serve.test_cli_serve:multiplication_router",
        ]
    )
    app, ids = build_serve_app(args, tmp_path)
    assert ids == ["mul"]
    with live(app) as s:
        r = s.client.post("/adapters/generate", json={"description": "add two numbers"})
        assert r.status_code == 200, r.text
        name = r.json()["id"]
        r = s.client.post("/generate", json={"prompt": "1+1=", "adapter": name})
        assert r.status_code == 200 and r.json()["adapter"] == name
        r = s.client.post("/generate", json={"prompt": "07*41=", "adapter": "auto"})
        assert r.status_code == 200 and r.json()["adapter"] == "mul" and r.json()["routed"]
    assert any(tmp_path.iterdir())  # the generator wrote into the server's work folder


def test_adapters_option_takes_a_folder_of_adapters(tmp_path):
    import shutil

    shutil.copytree(MUL2, tmp_path / "lib" / "a")
    shutil.copytree(MUL2, tmp_path / "lib" / "b")
    (tmp_path / "lib" / "not_an_adapter").mkdir()
    args = build_parser().parse_args(
        ["serve", "--checkpoint", str(CHECKPOINT), "--adapters", str(tmp_path / "lib")]
    )
    app, ids = build_serve_app(args, tmp_path)
    assert ids == ["a", "b"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--adapters", "/no/such/folder"], "--adapters: '/no/such/folder' is not a folder"),
        (["--adapters", str(MUL2), f"lora_mul2={MUL2}"], "id 'lora_mul2' given twice"),
        (["--adapters", str(ROOT / "bench")], "holds no PEFT-format adapter"),
        (["--adapter-factory", "no_colon"], "--adapter-factory: expected MODULE:NAME"),
        (["--adapter-factory", "json:no_such_name"], "--adapter-factory: cannot load"),
        (["--skill-router", "no.such.module:f"], "--skill-router: cannot load"),
        (["--port", "70000"], "--port must be in [0, 65535]"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_option(argv, words, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ryzen-opt serve: error:") and words in err, err


def test_the_listening_socket_gives_connections_tcp_nodelay():
    # asyncio sets TCP_NODELAY only on sockets created as IPPROTO_TCP; on one created without
    # it every keep-alive response waited ~40 ms for the client's delayed ACK.
    import asyncio
    import socket

    from ryzen_opt.cli import _listen_socket

    async def check() -> int:
        got: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                s = transport.get_extra_info("socket")
                got.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = _listen_socket("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        value = await asyncio.wait_for(got, 10)
        writer.close()
        server.close()
        return value

    assert asyncio.run(check()) != 0
