"""``ryzen-opt serve --instant``: Text-to-LoRA behind ``POST /adapters/generate`` and the SVF
experts behind ``adapter="auto"``, live, against the same components used directly."""

from __future__ import annotations

import copy

import pytest

httpx = pytest.importorskip("httpx", reason="needs the 'serve' extra")
pytest.importorskip("fastapi", reason="needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="needs the 'serve' extra")

import torch  # noqa: E402

from ryzen_opt.adapters import AdapterRegistry, SVFExperts, TextToLoRA  # noqa: E402
from ryzen_opt.cli import build_parser, build_serve_app, main  # noqa: E402
from ryzen_opt.models import load_checkpoint  # noqa: E402
from ryzen_opt.models.tasks import CharTokenizer  # noqa: E402
from ryzen_opt.serve import create_app  # noqa: E402
from ryzen_opt.serve.instant import BASE_FOLDER, SVF_FOLDER, T2L_FOLDER  # noqa: E402
from tests.serve.conftest import live, sse_events  # noqa: E402

CHECKPOINT = BASE_FOLDER  # the base the instant adapters were trained over

TOK = CharTokenizer()
PROMPTS = ("12+34=", "=45+38=", "53-17=")  # plain, reversed-answer and plain tasks


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("instant")
    args = build_parser().parse_args(["serve", "--checkpoint", str(CHECKPOINT), "--instant"])
    app, _ = build_serve_app(args, work)
    with live(app) as s:
        yield s


def _greedy(model, prompt: str, new: int = 16) -> str:
    ids = torch.tensor([TOK.encode(prompt)])
    out = model.generate(ids, new, eos_id=TOK.EOS)
    return TOK.decode(out[0, ids.shape[1] :])


def test_a_description_gives_the_adapter_text_to_lora_makes(server, tmp_path):
    desc = "add two 2-digit numbers"
    r = server.client.post("/adapters/generate", json={"description": desc, "seed": 3})
    assert r.status_code == 200, r.text
    info = r.json()
    again = server.client.post("/adapters/generate", json={"description": desc, "seed": 3})
    assert again.json()["id"] == info["id"]  # same description and seed: the same adapter
    reg = AdapterRegistry(load_checkpoint(CHECKPOINT))
    reg.register("t2l", TextToLoRA.load(T2L_FOLDER).generate(desc, seed=3).save(tmp_path / "a"))
    ids = torch.tensor([TOK.encode("12+34=")])
    want = reg.generate(ids, adapter="t2l", max_new_tokens=16, eos_id=TOK.EOS)
    r = server.client.post("/generate", json={"prompt": "12+34=", "adapter": info["id"]})
    assert r.status_code == 200, r.text
    assert r.json()["completion"] == TOK.decode(want[0, ids.shape[1] :])
    assert server.client.get("/adapters").json()["generator"] is True


@pytest.mark.parametrize("description", ["", "   ", 123, "x" * 1001])
def test_bad_descriptions_are_422(server, description):
    r = server.client.post("/adapters/generate", json={"description": description})
    assert r.status_code == 422, r.text
    assert "description" in r.text


def test_auto_runs_the_svf_two_passes_and_restores_the_base_weights(server):
    base = load_checkpoint(CHECKPOINT)
    svf = SVFExperts.load(SVF_FOLDER, base)
    model = server.app.state.service.registry.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for prompt in PROMPTS:
        expert = svf.identify(base, torch.tensor([TOK.encode(prompt)]))[0]
        adapted = copy.deepcopy(base)
        svf.apply(adapted, expert)
        r = server.client.post("/generate", json={"prompt": prompt, "adapter": "auto"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == f"expert:{expert}" and body["routed"], body
        assert body["completion"] == _greedy(adapted, prompt), prompt
        with server.client.stream(
            "POST", "/generate", json={"prompt": prompt, "adapter": "auto", "stream": True}
        ) as s:
            events = sse_events(s.iter_lines())
        assert events[0] == ("start", {"adapter": f"expert:{expert}", "routed": True})
        assert events[-1][1]["completion"] == body["completion"]
    # The stream's last event can reach the client before its job restored the weights: a
    # request queued behind it on the model worker returns after the restore.
    assert server.client.post("/generate", json={"prompt": "1+1="}).status_code == 200
    after = model.state_dict()
    diff = [k for k in before if not torch.equal(before[k], after[k])]
    assert not diff, diff  # exact base weights back


def test_router_and_experts_are_exclusive():
    reg = AdapterRegistry(load_checkpoint(CHECKPOINT))

    class Experts:
        def identify(self, prompt):
            return "x"

        def applied(self, name):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="not both"):
        create_app(reg, TOK, skill_router=lambda p: None, experts=Experts())
    with pytest.raises(TypeError, match="experts must have an applied method"):
        create_app(reg, TOK, experts=type("E", (), {"identify": lambda s, p: "x"})())


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--instant", "--adapter-factory", "json:dumps"], "--instant names --adapter-factory"),
        (["--experts", "json:dumps", "--skill-router", "json:loads"], "both choose"),
        (["--experts", "no.such.module:f"], "--experts: cannot load"),
    ],
)
def test_conflicting_options_are_usage_errors(argv, words, capsys):
    assert main(["serve", *argv]) == 2
    assert words in capsys.readouterr().err


def test_the_readmes_instant_curl_calls_work(server):
    import json
    import re

    from tests.serve.conftest import ROOT

    section = (ROOT / "README.md").read_text()
    section = section[section.index("## HTTP API") :]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[1].replace("\\\n", " ")
    assert "serve --port 8000 --instant" in block
    calls = [line for line in block.splitlines() if line.lstrip().startswith("curl")]
    assert len(calls) == 2
    answers = []
    for line in calls:
        body = json.loads(re.search(r"-d '(.*?)'", line).group(1))
        r = server.client.post("/generate", json=body)
        assert r.status_code == 200, (line, r.text)
        answers.append(r.json())
    listed = [a["id"] for a in server.client.get("/adapters").json()["adapters"]]
    assert answers[0]["adapter"] in listed  # the description's generated adapter served it
    shown = re.search(r'"adapter": "(expert:\w+)" in the answer', block).group(1)
    assert answers[1]["adapter"] == shown  # what the README says the first pass picks


def test_instant_defaults_to_the_base_and_library_the_adapters_were_trained_over(
    tmp_path, monkeypatch
):
    from ryzen_opt.adapters.tasks import SEEN
    from tests.serve.conftest import ROOT

    monkeypatch.chdir(ROOT)  # the defaults are relative folders, as on the command line
    args = build_parser().parse_args(["serve", "--instant"])
    _, ids = build_serve_app(args, tmp_path)
    assert args.checkpoint.resolve() == BASE_FOLDER
    assert sorted(ids) == sorted(s.name for s in SEEN)  # the task-LoRA library


def test_instant_over_another_base_model_is_an_error_naming_the_model(capsys):
    from tests.serve.conftest import CHECKPOINT as DEFAULT

    assert main(["serve", "--checkpoint", str(DEFAULT), "--instant"]) == 1
    err = capsys.readouterr().err
    assert "model: the experts" in err and "another base model" in err
