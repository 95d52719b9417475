"""ONNX Runtime quantization: which nodes get quantized, size, error bounds, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ryzen_opt.compress import OnnxGenerator, QuantizeConfig, quantize
from ryzen_opt.compress.quantize import weight_nodes


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _logits(path, ids):
    return OnnxGenerator(path).forward(ids)[0]


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(3, 32, (4, 9))


@pytest.fixture(scope="module")
def feeds(fp32_onnx):
    gen = OnnxGenerator(fp32_onnx)
    rng = np.random.default_rng(1)
    out = []
    for _ in range(4):
        x = rng.integers(3, 32, (8, 12))
        out.append(
            {
                "input_ids": x,
                "position_ids": np.broadcast_to(np.arange(12), x.shape).copy(),
                **dict(zip(gen.past_names, gen.empty_past(8), strict=True)),
            }
        )
    return out


def test_dynamic_int8_quantizes_weights_only_and_stays_close(fp32_onnx, tmp_path, ids):
    out = quantize(fp32_onnx, tmp_path / "dyn.onnx", QuantizeConfig(mode="dynamic"))
    onnx.checker.check_model(str(out), full_check=True)
    ops = _ops(out)
    # 2 layers x (qkv, proj, fc1, fc2) + head = 9 weight matmuls become integer matmuls;
    # the 2 x 2 attention matmuls (activation x activation) stay fp32 MatMul.
    n_int = ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0)
    assert n_int == 9, ops
    assert ops.get("MatMul", 0) == 4, ops
    err = _rel(_logits(out, ids), _logits(fp32_onnx, ids))
    assert err < 0.05, err  # int8 weights + per-call activation ranges: ~1% on this model
    assert OnnxGenerator(out).max_seq_len == 48  # metadata carried over


def test_dynamic_int8_stores_the_tied_token_table_once(fp32_onnx, tmp_path, ids):
    out = quantize(fp32_onnx, tmp_path / "dyn.onnx", QuantizeConfig(mode="dynamic"))
    g = onnx.load(str(out)).graph
    inits = {i.name for i in g.initializer}
    b_inputs = {n.input[1] for n in g.node if n.op_type == "MatMulInteger"}
    emb = [n for n in g.node if n.op_type == "Gather" and "input_ids" in n.input]
    assert len(emb) == 1 and emb[0].input[0] in inits & b_inputs  # reads the head's matrix
    assert sum("head.weight" in name for name in inits) == 0  # no second copy
    err = _rel(_logits(out, ids), _logits(fp32_onnx, ids))
    assert err < 0.05, err


def test_weight_nodes_skip_attention_matmuls(fp32_onnx):
    names = weight_nodes(fp32_onnx)
    proto = onnx.load(str(fp32_onnx))
    by_name = {n.name: n.op_type for n in proto.graph.node}
    assert sum(by_name[n] == "MatMul" for n in names) == 9
    assert sum(by_name[n] == "Gather" for n in names) == 2


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
@pytest.mark.parametrize("calib", ["minmax", "entropy"])
def test_static_int8_with_calibration(fp32_onnx, tmp_path, ids, feeds, fmt, calib):
    cfg = QuantizeConfig(mode="static", quant_format=fmt, calibration=calib)
    out = quantize(fp32_onnx, tmp_path / f"st_{fmt}_{calib}.onnx", cfg, calibration_feeds=feeds)
    ops = _ops(out)
    if fmt == "qdq":
        assert ops.get("QuantizeLinear", 0) >= 9 and ops.get("DequantizeLinear", 0) >= 9, ops
    else:
        assert ops.get("QLinearMatMul", 0) >= 9, ops
    err = _rel(_logits(out, ids), _logits(fp32_onnx, ids))
    assert err < 0.2, err


def test_static_needs_calibration_feeds(fp32_onnx, tmp_path):
    with pytest.raises(ValueError, match="calibration_feeds"):
        quantize(fp32_onnx, tmp_path / "s.onnx", QuantizeConfig(mode="static"))


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_uses_matmulnbits(fp32_onnx, tmp_path, ids, bits):
    cfg = QuantizeConfig(mode="weight_only", bits=bits, block_size=16)
    out = quantize(fp32_onnx, tmp_path / f"wo{bits}.onnx", cfg)
    ops = _ops(out)
    assert ops.get("MatMulNBits", 0) == 9, ops
    if bits == 4:
        assert ops.get("GatherBlockQuantized", 0) == 2, ops
    err = _rel(_logits(out, ids), _logits(fp32_onnx, ids))
    assert err < (0.2 if bits == 4 else 0.05), err


def test_int4_token_gather_reads_the_head_blob(fp32_onnx, tmp_path, ids):
    cfg = QuantizeConfig(mode="weight_only", bits=4, block_size=16)
    out = quantize(fp32_onnx, tmp_path / "wo4.onnx", cfg)
    g = onnx.load(str(out)).graph
    blobs = {n.input[1] for n in g.node if n.op_type == "MatMulNBits"}
    tok = [n for n in g.node if n.op_type == "GatherBlockQuantized" and "input_ids" in n.input]
    assert len(tok) == 1 and tok[0].input[0] in blobs
    # Only the position table remains a separate int4 tensor: no second token table.
    int4 = [i.name for i in g.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 1 and "pos_emb" in int4[0], int4
    assert _rel(_logits(out, ids), _logits(fp32_onnx, ids)) < 0.2


def test_quantize_bad_input_names_argument(fp32_onnx, tmp_path):
    with pytest.raises(FileNotFoundError, match="src"):
        quantize(tmp_path / "none.onnx", tmp_path / "o.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage\xff\xfe")
    with pytest.raises(ValueError, match="src"):
        quantize(bad, tmp_path / "o.onnx")
    with pytest.raises(TypeError, match="config"):
        quantize(fp32_onnx, tmp_path / "o.onnx", config={"mode": "dynamic"})


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"mode": "fp8"}, "mode"),
        ({"weight_type": "i8"}, "weight_type"),
        ({"bits": 3}, "bits"),
        ({"block_size": 48}, "block_size"),
        ({"calibration": "mse"}, "calibration"),
        ({"accuracy_level": 5}, "accuracy_level"),
        ({"per_channel": 1}, "per_channel"),
        ({"calibration_samples": 0}, "calibration_samples"),
    ],
)
def test_quantize_config_validates_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantizeConfig(**kwargs)


def test_quantize_config_to_dict_round_trips():
    c = QuantizeConfig(mode="weight_only", bits=8, block_size=64)
    assert QuantizeConfig(**c.to_dict()) == c
