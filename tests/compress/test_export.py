"""Export + OnnxGenerator: fp32 parity with PyTorch, identical greedy generations, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ryzen_opt.compress import OnnxGenerator, export_onnx
from ryzen_opt.compress.runtime import sample_next_np
from tests.assertions import TOL, assert_close_rel

FP32 = TOL[torch.float32]


def test_export_passes_full_checker_and_names_io(fp32_onnx, model):
    onnx.checker.check_model(str(fp32_onnx), full_check=True)
    proto = onnx.load(str(fp32_onnx))
    ins = [i.name for i in proto.graph.input]
    outs = [o.name for o in proto.graph.output]
    assert ins == [
        "input_ids",
        "position_ids",
        "past_key_0",
        "past_value_0",
        "past_key_1",
        "past_value_1",
    ]
    assert outs == [
        "logits",
        "present_key_0",
        "present_value_0",
        "present_key_1",
        "present_value_1",
    ]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["max_seq_len"] == str(model.config.max_seq_len)


@pytest.mark.parametrize("batch,prompt_len", [(1, 1), (1, 7), (3, 5), (4, 2)])
def test_logits_match_pytorch_for_prefill_and_32_decode_steps(fp32_onnx, model, batch, prompt_len):
    gen = OnnxGenerator(fp32_onnx)
    g = torch.Generator().manual_seed(batch * 100 + prompt_len)
    ids = torch.randint(0, 32, (batch, prompt_len), generator=g)
    with torch.no_grad():
        ref, cache = model(ids)
    out, past = gen.forward(ids.numpy())
    assert_close_rel(torch.from_numpy(out), ref, FP32, "prefill logits")
    for step in range(32):
        nxt = torch.randint(0, 32, (batch, 1), generator=g)
        with torch.no_grad():
            ref, cache = model(nxt, cache)
        out, past = gen.forward(nxt.numpy(), past=past)
        assert_close_rel(torch.from_numpy(out), ref, FP32, f"decode step {step} logits")
    for (k, v), pk, pv in zip(cache, past[0::2], past[1::2], strict=True):
        assert_close_rel(torch.from_numpy(pk), k, FP32, "present key")
        assert_close_rel(torch.from_numpy(pv), v, FP32, "present value")


def test_chunk_after_cache_matches_pytorch(fp32_onnx, model):
    gen = OnnxGenerator(fp32_onnx)
    ids = torch.randint(0, 32, (2, 6))
    chunk = torch.randint(0, 32, (2, 4))
    with torch.no_grad():
        _, cache = model(ids)
        ref, _ = model(chunk, cache)
    _, past = gen.forward(ids.numpy())
    out, _ = gen.forward(chunk.numpy(), past=past)
    assert_close_rel(torch.from_numpy(out), ref, FP32, "chunk logits")


def test_explicit_position_ids_are_used(fp32_onnx, model):
    gen = OnnxGenerator(fp32_onnx)
    ids = np.array([[3, 4, 5]])
    a, _ = gen.forward(ids)
    b, _ = gen.forward(ids, position_ids=np.array([[4, 5, 6]]))
    assert not np.allclose(a, b)


@pytest.mark.parametrize("batch", [1, 5])
def test_greedy_generation_identical_to_model_generate(fp32_onnx, model, batch):
    gen = OnnxGenerator(fp32_onnx)
    ids = torch.randint(3, 32, (batch, 4))
    for eos in (None, 2):
        with torch.no_grad():
            ref = model.generate(ids, 30, eos_id=eos)
        out = gen.generate(ids.numpy(), 30, eos_id=eos)
        assert out.shape == tuple(ref.shape)
        np.testing.assert_array_equal(out, ref.numpy())


def test_eos_stops_rows_independently(fp32_onnx, model):
    gen = OnnxGenerator(fp32_onnx)
    ids = torch.randint(3, 32, (6, 3))
    first = gen.generate(ids.numpy(), 1)[:, -1]
    eos = int(first[0])  # row 0 stops at once; rows that predict other ids go on
    out = gen.generate(ids.numpy(), 10, eos_id=eos)
    assert (out[0, 3:] == eos).all()
    with torch.no_grad():
        ref = model.generate(ids, 10, eos_id=eos)
    np.testing.assert_array_equal(out, ref.numpy())


def test_sampling_is_seeded_and_topk1_is_greedy(fp32_onnx):
    gen = OnnxGenerator(fp32_onnx)
    ids = np.random.default_rng(0).integers(3, 32, (4, 3))
    a = gen.generate(ids, 12, temperature=1.0, top_p=0.9, seed=7)
    b = gen.generate(ids, 12, temperature=1.0, top_p=0.9, seed=7)
    c = gen.generate(ids, 12, temperature=1.0, top_p=0.9, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(
        gen.generate(ids, 12, temperature=0.7, top_k=1, seed=1), gen.generate(ids, 12)
    )


def test_sampler_follows_topk_and_topp_rules():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    k2 = sample_next_np(logits, 1.0, 2, None, rng)
    assert set(np.unique(k2)) == {0, 1}
    assert abs((k2 == 0).mean() - 0.5 / 0.8) < 0.03
    p = sample_next_np(logits, 1.0, None, 0.7, rng)  # mass before id 2 is 0.8 >= 0.7: dropped
    assert set(np.unique(p)) == {0, 1}


def test_export_without_cache_returns_logits_only(model, tmp_path):
    path = export_onnx(model, tmp_path / "nocache.onnx", with_kv_cache=False)
    gen = OnnxGenerator(path)
    assert not gen.has_cache and gen.output_names == ["logits"]
    ids = torch.randint(3, 32, (2, 5))
    with torch.no_grad():
        ref = model.generate(ids, 8)
    np.testing.assert_array_equal(gen.generate(ids.numpy(), 8), ref.numpy())


def test_bad_inputs_raise_naming_the_argument(model, tmp_path):
    with pytest.raises(TypeError, match="model"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "x.onnx", opset=9)
    with pytest.raises(TypeError, match="path"):
        export_onnx(model, 3)
    with pytest.raises(FileNotFoundError, match="path"):
        OnnxGenerator(tmp_path / "missing.onnx")
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07not an onnx model at all")
    with pytest.raises(ValueError, match="path"):
        OnnxGenerator(bad)


def test_generate_rejects_bad_arguments(fp32_onnx):
    gen = OnnxGenerator(fp32_onnx)
    ids = np.array([[3, 4]])
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate(ids, 47)
    with pytest.raises(TypeError, match="input_ids"):
        gen.generate(np.array([1.5, 2.0]), 3)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(ids, 3, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(ids, 3, temperature=-1.0)


def test_runtime_module_runs_without_torch(fp32_onnx, model):
    """The generator file works on a machine without PyTorch (torch import blocked)."""
    import ryzen_opt.compress.runtime as rt

    ids = [[5, 6, 7], [8, 9, 10]]
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), 10).tolist()
    code = (
        "import sys, json, importlib.util\n"
        "sys.modules['torch'] = None\n"
        f"spec = importlib.util.spec_from_file_location('rt', {str(Path(rt.__file__))!r})\n"
        "rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)\n"
        f"g = rt.OnnxGenerator({str(fp32_onnx)!r})\n"
        f"print(json.dumps(g.generate(__import__('numpy').array({ids}), 10).tolist()))\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == ref
