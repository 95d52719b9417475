"""The HTTP API, live: uvicorn on a loopback port, real HTTP requests through httpx."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time

import pytest

httpx = pytest.importorskip("httpx", reason="needs the 'serve' extra")
pytest.importorskip("fastapi", reason="needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="needs the 'serve' extra")

import torch  # noqa: E402

from ryzen_opt.adapters import AdapterRegistry  # noqa: E402
from ryzen_opt.models import load_checkpoint  # noqa: E402
from ryzen_opt.models.tasks import CharTokenizer  # noqa: E402
from ryzen_opt.scaling import InferenceScalingEngine, SamplingConfig  # noqa: E402
from ryzen_opt.serve import (  # noqa: E402
    ServeConfig,
    arithmetic_verify,
    create_app,
    default_scaling_engine,
)
from tests.serve.conftest import CHECKPOINT, MUL2, live, sse_events  # noqa: E402
from tests.serve.lora_factory import HashLoraFactory  # noqa: E402

TOK = CharTokenizer()
PROMPTS = ["07*41=", "12*12=", "482+317=", "093-018="]


class SlowRegistry(AdapterRegistry):
    """The registry with an optional pause per streamed token, counting the tokens."""

    delay = 0.0
    streamed = 0

    def generate_stream(self, *args, **kwargs):
        with contextlib.closing(super().generate_stream(*args, **kwargs)) as inner:
            for t in inner:
                type(self).streamed += 1
                time.sleep(self.delay)
                yield t


def route(prompt: str) -> str | None:
    """The test's skill router: multiplication -> lora_mul2, subtraction -> a bad id."""
    return {"*": "lora_mul2", "-": "not-served"}.get(next((c for c in prompt if c in "+-*"), ""))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    registry = SlowRegistry(load_checkpoint(CHECKPOINT), max_resident=2)
    factory = HashLoraFactory(registry, tmp_path_factory.mktemp("generated"))
    app = create_app(
        registry,
        TOK,
        adapter_factory=factory,
        skill_router=route,
        adapters={"lora_mul2": MUL2},
        config=ServeConfig(max_description_chars=200, max_n=8),
    )
    with live(app) as s:
        s.factory = factory
        yield s


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A server with neither an adapter generator nor a skill router."""
    app = create_app(AdapterRegistry(load_checkpoint(CHECKPOINT)), TOK)
    with live(app) as s:
        yield s


@pytest.fixture(scope="module")
def reference():
    """The same base model and adapters, called directly (no server)."""
    registry = AdapterRegistry(load_checkpoint(CHECKPOINT), max_resident=8)
    registry.register("lora_mul2", MUL2)
    return registry


def expected(reference, adapter: str | None, prompt: str, new: int = 16) -> list[int]:
    ids = torch.tensor([TOK.encode(prompt)])
    out = reference.generate(ids, adapter=adapter, max_new_tokens=new, eos_id=TOK.EOS)
    toks = out[0, ids.shape[1] :].tolist()
    return toks[: toks.index(TOK.EOS) + 1] if TOK.EOS in toks else toks


def make_adapter(server, reference, description: str, seed: int = 0) -> str:
    r = server.client.post("/adapters/generate", json={"description": description, "seed": seed})
    assert r.status_code == 200, r.text
    name = r.json()["id"]
    if name not in reference.registered:
        reference.register(name, server.factory(description, seed))
    return name


def test_adapters_lists_the_folder_adapter_with_its_metadata(server):
    r = server.client.get("/adapters")
    assert r.status_code == 200
    body = r.json()
    [mul2] = [a for a in body["adapters"] if a["id"] == "lora_mul2"]
    assert mul2["source"] == "folder" and mul2["rank"] == 16 and mul2["alpha"] == 32
    assert sorted(mul2["target_modules"]) == ["fc1", "fc2", "proj", "qkv"]
    # 2 layers x rank 16 x (in + out) summed over qkv 256->768, proj 256->256, fc1 256->512,
    # fc2 512->256
    assert mul2["parameters"] == 2 * 16 * (1024 + 512 + 768 + 768)
    assert body["generator"] is True and body["router"] is True


def test_generate_equals_registry_generate_for_every_adapter(server, reference):
    gen = make_adapter(server, reference, "add two three-digit numbers")
    outputs = {}
    for adapter in (None, "lora_mul2", gen):
        for prompt in PROMPTS:
            r = server.client.post("/generate", json={"prompt": prompt, "adapter": adapter})
            assert r.status_code == 200, r.text
            body = r.json()
            want = expected(reference, adapter, prompt)
            assert body["token_ids"] == want, (adapter, prompt)
            assert body["completion"] == TOK.decode(want)
            assert body["adapter"] == adapter and body["routed"] is False
            assert body["finish_reason"] == ("eos" if TOK.EOS in want else "length")
            outputs[adapter, prompt] = body["completion"]
    # the adapters change the answers, so equal outputs above are not the base model's thrice
    for a, b in ((None, "lora_mul2"), (None, gen), ("lora_mul2", gen)):
        assert any(outputs[a, p] != outputs[b, p] for p in PROMPTS), (a, b)


def test_max_new_tokens_cuts_the_completion(server, reference):
    r = server.client.post(
        "/generate", json={"prompt": "07*41=", "adapter": "lora_mul2", "max_new_tokens": 2}
    )
    body = r.json()
    assert body["token_ids"] == expected(reference, "lora_mul2", "07*41=", new=2)
    assert len(body["token_ids"]) == 2 and body["finish_reason"] == "length"


def test_stream_sends_the_tokens_of_generate_as_server_sent_events(server):
    for adapter in (None, "lora_mul2"):
        body = {"prompt": "07*41=", "adapter": adapter}
        plain = server.client.post("/generate", json=body).json()
        with server.client.stream("POST", "/generate", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.iter_lines())
        kinds = [k for k, _ in events]
        assert kinds[0] == "start" and kinds[-1] == "done"
        assert set(kinds[1:-1]) <= {"token"}
        tokens = [d for k, d in events if k == "token"]
        done = events[-1][1]
        assert "".join(d["text"] for d in tokens) == plain["completion"] == done["completion"]
        assert [d["id"] for d in tokens] + [TOK.EOS] == plain["token_ids"]
        assert done["adapter"] == adapter and done["finish_reason"] == "eos"


def test_generated_adapters_are_deterministic_and_reused(server, reference):
    first = server.client.post("/adapters/generate", json={"description": "subtract", "seed": 3})
    calls = server.factory.calls
    again = server.client.post("/adapters/generate", json={"description": "  subtract ", "seed": 3})
    assert server.factory.calls == calls  # the same stripped description: not generated again
    other = server.client.post("/adapters/generate", json={"description": "subtract", "seed": 4})
    assert first.status_code == again.status_code == other.status_code == 200
    a, b, c = first.json(), again.json(), other.json()
    assert a["id"] == b["id"] and b["cached"] is True and server.factory.calls == calls + 1
    assert c["id"] != a["id"] and c["cached"] is False
    assert a["source"] == "generated" and a["description"] == "subtract" and a["seed"] == 3
    assert a["generate_ms"] > 0 and a["parameters"] == 2 * 4 * (1024 + 512 + 768 + 768)
    listed = {x["id"] for x in server.client.get("/adapters").json()["adapters"]}
    assert {a["id"], c["id"]} <= listed


def test_generate_with_a_description_serves_the_generated_adapter(server, reference):
    text = "multiply two two-digit numbers"
    name = make_adapter(server, reference, text, seed=1)
    r = server.client.post("/generate", json={"prompt": "12*12=", "description": text, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == name
    assert r.json()["token_ids"] == expected(reference, name, "12*12=")


def test_auto_asks_the_skill_router(server, reference):
    r = server.client.post("/generate", json={"prompt": "07*41=", "adapter": "auto"})
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == "lora_mul2" and r.json()["routed"] is True
    assert r.json()["token_ids"] == expected(reference, "lora_mul2", "07*41=")
    r = server.client.post("/generate", json={"prompt": "482+317=", "adapter": "auto"})
    assert r.json()["adapter"] is None and r.json()["routed"] is True
    assert r.json()["token_ids"] == expected(reference, None, "482+317=")
    with server.client.stream(
        "POST", "/generate", json={"prompt": "07*41=", "adapter": "auto", "stream": True}
    ) as s:
        events = sse_events(s.iter_lines())
    assert events[0] == ("start", {"adapter": "lora_mul2", "routed": True})
    # a router naming an adapter the server does not serve is the server's fault: 500, said so
    for stream in (False, True):
        r = server.client.post(
            "/generate", json={"prompt": "093-018=", "adapter": "auto", "stream": stream}
        )
        assert r.status_code == 500 and "not-served" in r.json()["detail"]


def test_best_of_n_is_the_scaling_engines_choice(server, reference):
    body = {"prompt": "482+317=", "n": 6, "temperature": 1.0, "seed": 5}
    r = server.client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    engine = InferenceScalingEngine(
        reference.model,
        default_scaling_engine(reference.model, TOK).verifier,
        sampler=SamplingConfig(temperature=1.0, seed=5, eos_id=TOK.EOS),
    )
    reference.deactivate()
    [want] = engine.best_of_n([TOK.encode("482+317=")], 6, 16)
    assert got["completion"] == want.completion
    assert got["best_of"]["index"] == want.index and got["best_of"]["strategy"] == "verifier"
    assert [c["completion"] for c in got["best_of"]["candidates"]] == [
        c.completion for c in want.candidates
    ]
    assert len({c["completion"] for c in got["best_of"]["candidates"]}) > 1  # really sampled
    assert [c["verified"] for c in got["best_of"]["candidates"]] == [
        arithmetic_verify("482+317=", c.completion) for c in want.candidates
    ]
    r = server.client.post("/generate", json={**body, "strategy": "majority"})
    assert r.json()["best_of"]["strategy"] == "majority"


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/generate", {"prompt": "07*41=", "adapter": "nope"}, 404, "adapter 'nope' not found"),
        ("/adapters/generate", {"description": ""}, 422, "description is empty"),
        ("/adapters/generate", {"description": " \n\t "}, 422, "description is empty"),
        ("/adapters/generate", {"description": "x" * 201}, 422, "more than the 200"),
        ("/adapters/generate", {"description": 5}, 422, "description: Input should be"),
        ("/adapters/generate", {"description": ["add"]}, 422, "description: Input should be"),
        ("/adapters/generate", {"description": None}, 422, "description: Input should be"),
        ("/adapters/generate", {}, 422, "description: Field required"),
        ("/adapters/generate", {"description": "\x00\x01\x02"}, 422, "control characters"),
        ("/adapters/generate", {"description": "?!... --"}, 422, "no letter or digit"),
        ("/adapters/generate", {"description": "add", "seed": -1}, 422, "seed"),
        ("/adapters/generate", {"description": "add", "seed": "1"}, 422, "seed"),
        ("/generate", {"prompt": "07*41=", "description": ""}, 422, "description is empty"),
        ("/generate", {"prompt": ""}, 422, "prompt is empty"),
        ("/generate", {"prompt": "hello"}, 422, "outside the vocabulary"),
        ("/generate", {"prompt": 7}, 422, "prompt: Input should be a valid string"),
        (
            "/generate",
            {"prompt": "1" * 120, "max_new_tokens": 16},
            422,
            "prompt (121 tokens) + max_new_tokens (16) exceeds the model's max_seq_len=128",
        ),
        ("/generate", {"prompt": "1" * 127}, 422, "exceeds the model's max_seq_len=128"),
        ("/generate", {"prompt": "1+1=", "max_new_tokens": 0}, 422, "max_new_tokens"),
        ("/generate", {"prompt": "1+1=", "n": 0}, 422, "n: Input should be greater"),
        ("/generate", {"prompt": "1+1=", "n": 9}, 422, "n must be <= 8"),
        ("/generate", {"prompt": "1+1=", "n": "2"}, 422, "n: Input should be a valid integer"),
        ("/generate", {"prompt": "1+1=", "n": 2, "stream": True}, 422, "stream=true needs n=1"),
        ("/generate", {"prompt": "1+1=", "strategy": "majority"}, 422, "strategy needs n > 1"),
        ("/generate", {"prompt": "1+1=", "n": 2, "strategy": "best"}, 422, "strategy"),
        ("/generate", {"prompt": "1+1=", "temperature": -1}, 422, "temperature"),
        ("/generate", {"prompt": "1+1=", "temperature": 1e-40}, 422, "temperature must be 0"),
        ("/generate", {"prompt": "1+1=", "max_new_token": 4}, 422, "max_new_token: Extra"),
        (
            "/generate",
            {"prompt": "1+1=", "adapter": "lora_mul2", "description": "add"},
            422,
            "adapter or description, not both",
        ),
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(server, path, body, status, words):
    # the streamed form of a request is checked the same way, before any event is sent
    both = path == "/generate" and not {"n", "strategy", "stream"} & set(body)
    for stream in (False, True) if both else (False,):
        r = server.client.post(path, json={**body, "stream": True} if stream else body)
        assert r.status_code == status, r.text
        assert words in r.json()["detail"], r.json()


@pytest.mark.parametrize(
    "raw", [b'{"prompt": "07*41=",', b"not json", b"", b'{"prompt": "1+1=" "n": 2}']
)
def test_malformed_json_gets_422(server, raw):
    r = server.client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"]
    if raw:
        assert r.json()["detail"].startswith("malformed JSON")


@pytest.mark.parametrize("raw", [b"Infinity", b"1e400", b"NaN", b"-Infinity"])
def test_non_finite_temperatures_get_422_and_the_connection_stays_usable(server, raw):
    body = b'{"prompt": "1+1=", "temperature": ' + raw + b"}"
    for stream in (False, True):
        data = body[:-1] + (b', "stream": true}' if stream else b"}")
        r = server.client.post(
            "/generate", content=data, headers={"content-type": "application/json"}
        )
        assert r.status_code == 422 and "temperature" in r.json()["detail"], r.text
    assert server.client.get("/health").status_code == 200  # same keep-alive connection


def test_a_server_without_generator_or_router_answers_503(bare):
    r = bare.client.post("/adapters/generate", json={"description": "add two numbers"})
    assert r.status_code == 503 and "no adapter generator is configured" in r.json()["detail"]
    r = bare.client.post("/generate", json={"prompt": "1+1=", "description": "add"})
    assert r.status_code == 503 and "no adapter generator" in r.json()["detail"]
    r = bare.client.post("/generate", json={"prompt": "1+1=", "adapter": "auto"})
    assert r.status_code == 503 and "skill router" in r.json()["detail"]
    body = bare.client.get("/adapters").json()
    assert body == {"adapters": [], "generator": False, "router": False}


def test_a_client_leaving_mid_stream_stops_its_job_and_the_server_goes_on(server, reference):
    registry = server.app.state.service.registry
    before = server.client.get("/health").json()
    # temperature 30 draws nearly uniformly over 2048 ids: EOS is unlikely, the stream is long
    body = {"prompt": "1+1=", "stream": True, "temperature": 30.0, "max_new_tokens": 100}
    registry.delay, SlowRegistry.streamed = 0.02, 0
    try:
        with (
            httpx.Client(base_url=server.url, timeout=30) as c,
            c.stream("POST", "/generate", json=body) as r,
        ):
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("event: token")
                if seen == 3:
                    break  # leaving the block closes the connection
        deadline = time.monotonic() + 10
        while True:
            health = server.client.get("/health").json()
            if health["streams_cancelled"] > before["streams_cancelled"]:
                break
            assert time.monotonic() < deadline, health
            time.sleep(0.02)
        # the next request waits for the worker, so the stopped job is over by its answer
        r = server.client.post("/generate", json={"prompt": "07*41=", "adapter": "lora_mul2"})
    finally:
        registry.delay = 0.0
    assert r.status_code == 200
    assert r.json()["token_ids"] == expected(reference, "lora_mul2", "07*41=")
    assert 3 <= SlowRegistry.streamed < 60  # stopped soon after the client left, not at 100
    assert server.client.get("/health").json()["streams_open"] == 0


def test_concurrent_clients_each_get_their_own_adapters_output(server, reference):
    gen = make_adapter(server, reference, "reverse the digits of a sum")
    adapters = (None, "lora_mul2", gen)
    want = {(a, p): expected(reference, a, p) for a in adapters for p in PROMPTS}
    jobs = [(a, p, i % 3 == 0) for i, (a, p) in enumerate(list(want) * 3)]
    barrier = threading.Barrier(len(jobs))

    def one(job):
        adapter, prompt, stream = job
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait()
            body = {"prompt": prompt, "adapter": adapter, "stream": stream}
            if not stream:
                return c.post("/generate", json=body).json()["token_ids"]
            with c.stream("POST", "/generate", json=body) as r:
                events = sse_events(r.iter_lines())
            ids = [d["id"] for k, d in events if k == "token"]
            return ids + [TOK.EOS] if events[-1][1]["finish_reason"] == "eos" else ids

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    for (adapter, prompt, stream), ids in zip(jobs, got, strict=True):
        assert ids == want[adapter, prompt], (adapter, prompt, stream)


def test_the_readmes_curl_calls_work(server):
    import json
    import re

    from tests.serve.conftest import ROOT

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## HTTP API") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ")
    calls = [line for line in block.splitlines() if line.lstrip().startswith("curl")]
    assert len(calls) == 2
    for line in calls:
        path = re.search(r"localhost:8000(/\S*)", line).group(1)
        data = re.search(r"-d '(.*?)'", line)
        if data is None:
            r = server.client.get(path)
        else:
            r = server.client.post(path, json=json.loads(data.group(1)))
        assert r.status_code == 200, (line, r.text)
