"""bench.serve --quick: the real server under concurrent clients, every answer checked."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("httpx", reason="needs the 'serve' extra")
pytest.importorskip("fastapi", reason="needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="needs the 'serve' extra")

from bench import serve as bs  # noqa: E402


def test_quick_load_run_answers_every_request_correctly(tmp_path):
    out = tmp_path / "serve.json"
    argv = ["--quick", "--duration", "2", "--generate-requests", "3", "-o", str(out)]
    assert bs.main(argv) == 0
    data = json.loads(out.read_text())
    load = data["load"]
    assert load["clients"] == 4 and load["requests"] > 0 and load["ok"] == load["requests"]
    assert load["error"] == load["wrong"] == load["lost"] == 0
    assert {"plain", "stream", "best_of_4"} <= set(load["by_kind"])
    assert load["throughput_rps"] > 0 and load["p99_ms"] >= load["p50_ms"] > 0
    assert data["adapters_generate_idle"]["requests"] == 3
    assert "test-only" in data["adapter_generator"]
    env = data["environment"]
    assert env["command"] and env["commit"] and env["versions"]["fastapi"] != "not installed"
    assert out.with_suffix(".md").read_text().startswith("# bench.serve")


@pytest.mark.parametrize("arg", ["--clients", "--threads", "--generate-requests"])
def test_bad_counts_name_the_argument(arg, capsys):
    with pytest.raises(SystemExit):
        bs.main([arg, "0"])
    assert arg in capsys.readouterr().err


def test_quick_run_with_the_instant_adapters_checks_auto_answers_too(tmp_path):
    out = tmp_path / "serve.json"
    argv = ["--quick", "--instant", "--duration", "2", "--generate-requests", "3", "-o", str(out)]
    assert bs.main(argv) == 0
    data = json.loads(out.read_text())
    load = data["load"]
    assert load["requests"] > 0 and load["ok"] == load["requests"]
    assert any(body["adapter"] == "auto" for body in load["mix"])
    assert "Text-to-LoRA" in data["adapter_generator"]
