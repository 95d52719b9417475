"""OnnxGenerator input checks: the PyTorch model's rules and messages, without torch."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from ryzen_opt.compress import OnnxGenerator
from ryzen_opt.compress.export import set_metadata
from ryzen_opt.compress.runtime import sample_next_np

VOCAB = 32  # tests/compress/conftest.py's tiny model


@pytest.fixture(scope="module")
def gen(fp32_onnx):
    return OnnxGenerator(fp32_onnx)


@pytest.mark.parametrize("ids", [[[5, -1]], [[5, VOCAB]], [[VOCAB + 7, 3]]])
def test_out_of_vocabulary_ids_raise_like_the_torch_model(gen, model, ids):
    # ONNX Runtime's Gather reads -1 as the last row (token 31) and fails with its own
    # InvalidArgument past the end; both must be refused with the torch model's message.
    with pytest.raises(ValueError) as onnx_err:
        gen.generate(np.array(ids), 3)
    with pytest.raises(ValueError) as torch_err:
        model.generate(torch.tensor(ids), 3)
    lo, hi = min(min(r) for r in ids), max(max(r) for r in ids)
    assert str(onnx_err.value) == (
        f"input_ids token ids must lie in [0, {VOCAB}), got min {lo} max {hi}"
    )
    # Same wording as the torch model's, whose argument is called idx.
    assert str(onnx_err.value).removeprefix("input_ids") == str(torch_err.value).removeprefix("idx")
    msg = re.escape(f"input_ids token ids must lie in [0, {VOCAB})")
    with pytest.raises(ValueError, match=msg):
        gen.forward(np.array(ids))


def test_ids_of_the_wrong_kind_raise_naming_input_ids(gen):
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        gen.generate(np.array([[1.5, 2.0]]), 3)
    with pytest.raises(ValueError, match=r"input_ids must be 2-D \(batch, seq\)"):
        gen.generate(np.array([1, 2]), 3)
    with pytest.raises(ValueError, match="input_ids must hold at least one token"):
        gen.generate(np.zeros((2, 0), np.int64), 3)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0, "0.5", True])
def test_bad_temperature_raises_naming_it(gen, temperature):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        gen.generate(np.array([[3, 4]]), 3, temperature=temperature)


def test_tiny_temperature_samples_the_greedy_token(gen):
    # 1e-320 used to overflow logits/temperature to inf: every probability NaN, token 0.
    ids = np.array([[3, 4, 5], [9, 8, 7]])
    greedy = gen.generate(ids, 6)
    assert (greedy[:, 3:] != 0).any()  # the check below could not tell otherwise
    np.testing.assert_array_equal(gen.generate(ids, 6, temperature=1e-320, seed=1), greedy)
    logits = np.array([[0.0, 3e38, -3e38, 1.0]], np.float32)
    rng = np.random.default_rng(0)
    assert sample_next_np(logits, 1e-320, None, None, rng).tolist() == [1]
    assert sample_next_np(logits, 1e-320, 2, 0.5, rng).tolist() == [1]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(eos_id=VOCAB), "eos_id"),
        (dict(eos_id=True), "eos_id"),
        (dict(eos_id=-1), "eos_id"),
        (dict(top_k=True), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_p=True), "top_p"),
        (dict(seed="abc"), "seed"),
        (dict(seed=2**70), "seed"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_generation_settings_raise_naming_them(gen, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        gen.generate(np.array([[3, 4]]), 3, temperature=1.0, **kwargs)


def test_eos_id_message_matches_the_torch_model(gen, model):
    with pytest.raises(ValueError) as onnx_err:
        gen.generate(np.array([[3, 4]]), 3, eos_id=VOCAB)
    with pytest.raises(ValueError) as torch_err:
        model.generate(torch.tensor([[3, 4]]), 3, eos_id=VOCAB)
    assert str(onnx_err.value) == str(torch_err.value)


def test_numpy_integer_settings_are_accepted(gen):
    out = gen.generate(np.array([[3, 4]]), np.int64(3), eos_id=np.int32(2), seed=np.uint64(5))
    assert out.shape[1] <= 5


@pytest.mark.parametrize(
    "key,value",
    [("max_seq_len", "48.5"), ("max_seq_len", "abc"), ("max_seq_len", "0"), ("vocab_size", "-3")],
)
def test_bad_metadata_raises_naming_the_file_and_key(fp32_onnx, tmp_path, key, value):
    path = tmp_path / "m.onnx"
    shutil.copy(fp32_onnx, path)
    set_metadata(path, {key: value})
    with pytest.raises(ValueError, match=rf"path .*m\.onnx.*metadata '{key}' must be an integer"):
        OnnxGenerator(path)


def test_vocabulary_comes_from_the_logits_without_metadata(fp32_onnx, tmp_path):
    import onnx

    proto = onnx.load(str(fp32_onnx))
    del proto.metadata_props[:]
    path = tmp_path / "bare.onnx"
    onnx.save(proto, str(path))
    g = OnnxGenerator(path)
    assert g.vocab_size == VOCAB and g.max_seq_len is None
    with pytest.raises(ValueError, match=re.escape(f"must lie in [0, {VOCAB})")):
        g.generate(np.array([[VOCAB]]), 2)


def test_compressor_sessions_do_not_spin(fp32_onnx, model, task, tmp_path):
    # Two sessions timed in turn: a spinning pool would hold the cores the other needs
    # (fp32 against itself read 0.38-2.68x at 2 threads with spinning on).
    from ryzen_opt.compress import SemanticCompressor

    key = "session.intra_op.allow_spinning"
    comp = SemanticCompressor(model, task, workdir=tmp_path)
    opts = comp._gen(fp32_onnx).session.get_session_options()
    assert opts.get_session_config_entry(key) == "0"
    with pytest.raises(TypeError, match="spinning must be a bool"):
        OnnxGenerator(fp32_onnx, spinning="no")
