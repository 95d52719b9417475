"""ONNX Runtime quantization of an exported decoder: dynamic int8, static int8, weight-only.

Every path runs ONNX Runtime's quantization pre-processing first (symbolic shape inference
and graph optimization, ``quant_pre_process``), then quantizes only the weight-bearing nodes:
``MatMul`` nodes whose second input is an initializer (the linears and the output head) and
``Gather`` nodes over an initializer (the embeddings). The attention matmuls multiply two
activations; quantizing them costs accuracy and brings no size, so they stay fp32.

The metadata written by ``export_onnx`` (``max_seq_len``, ...) is carried to every output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ryzen_opt.compress.export import read_metadata, set_metadata

_FORMATS = ("qdq", "qoperator")
_TYPES = ("s8", "u8")
_CALIB = ("minmax", "entropy", "percentile")
_MODES = ("dynamic", "static", "weight_only")


def _check_choice(name: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


@dataclass
class QuantizeConfig:
    """How to quantize an exported decoder with ONNX Runtime.

    Args:
        mode: ``"dynamic"`` (int8 weights, activations quantized per call), ``"static"``
            (int8 weights and activations, activation ranges from calibration data) or
            ``"weight_only"`` (``MatMulNBits``: int4/int8 weights, fp32 compute on dequant).
        weight_type: ``"s8"`` or ``"u8"`` int8 weights (dynamic/static).
        activation_type: ``"s8"`` or ``"u8"`` activations (static only).
        quant_format: ``"qdq"`` (Q/DQ pairs the runtime fuses) or ``"qoperator"`` (integer
            operators in the graph); static only: dynamic quantization writes integer ops.
        per_channel: one scale per output channel instead of per tensor.
        calibration: ``"minmax"``, ``"entropy"`` or ``"percentile"`` (static only).
        calibration_samples: batches of task prompts fed to the calibrator (static only).
        bits: 4 or 8 (weight-only).
        block_size: weights per scale along the reduction axis (weight-only; power of 2, >=16).
        accuracy_level: ``MatMulNBits`` compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16,
            4 int8 (activations quantized per block, the VNNI path).
        symmetric: symmetric weight-only quantization (no zero points).
        quantize_embeddings: also quantize the embedding ``Gather`` tables (they hold a large
            share of a small-vocabulary-width model's bytes).
    """

    mode: str = "dynamic"
    # s8 weights: VNNI's vpdpbusd multiplies u8 activations by s8 weights in one instruction.
    weight_type: str = "s8"
    activation_type: str = "u8"
    quant_format: str = "qdq"
    per_channel: bool = False
    calibration: str = "minmax"
    calibration_samples: int = 8
    bits: int = 4
    # 32: the common int4 block; 128 halves the scale overhead but loses accuracy on a
    # 256-wide model whose rows hold only 2 blocks.
    block_size: int = 32
    # 4 (int8 compute): the fastest MatMulNBits kernel on AVX-512 VNNI.
    accuracy_level: int = 4
    symmetric: bool = True
    quantize_embeddings: bool = True

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, _MODES)
        _check_choice("weight_type", self.weight_type, _TYPES)
        _check_choice("activation_type", self.activation_type, _TYPES)
        _check_choice("quant_format", self.quant_format, _FORMATS)
        _check_choice("calibration", self.calibration, _CALIB)
        _check_choice("bits", self.bits, (4, 8))
        _check_choice("accuracy_level", self.accuracy_level, (0, 1, 2, 3, 4))
        for name in ("per_channel", "symmetric", "quantize_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of 2 >= 16, got {bs!r}")
        n = self.calibration_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"calibration_samples must be an int >= 1, got {n!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_onnx_file(path: Any, name: str = "path") -> Path:
    """Return ``path`` as a Path after checking it is a readable ONNX model; raise naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{name} {str(p)!r}: ONNX file does not exist")
    try:
        onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, onnx its own types
        raise ValueError(f"{name} {str(p)!r} is not a valid ONNX model: {e}") from None
    return p


def preprocess(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """ONNX Runtime's quantization pre-processing: shape inference + graph optimization.

    Args:
        src: input ``.onnx``.
        dst: output ``.onnx``.

    Returns:
        ``dst``.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = check_onnx_file(src, "src")
    dst = Path(dst)
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception:  # symbolic inference cannot follow every exporter pattern
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def weight_nodes(path: str | os.PathLike, embeddings: bool = True) -> list[str]:
    """Names of the MatMul (weight as second input) and Gather (table as first input) nodes.

    Args:
        path: the ``.onnx`` file.
        embeddings: include the embedding ``Gather`` nodes.

    Returns:
        Node names, graph order.
    """
    proto = onnx.load(str(path))
    inits = {i.name for i in proto.graph.initializer}
    names = []
    for n in proto.graph.node:
        if (n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits) or (
            embeddings and n.op_type == "Gather" and n.input[0] in inits
        ):
            names.append(n.name)
    return names


def _ensure_names(path: Path) -> None:
    # The quantizers select nodes by name; give anonymous nodes one.
    proto = onnx.load(str(path))
    changed = False
    for i, n in enumerate(proto.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
            changed = True
    if changed:
        onnx.save(proto, str(path))


class _FeedReader:
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - not used by the calibrators we call
        pass


def _qtype(t: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if t == "s8" else QuantType.QUInt8


def quantize(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: QuantizeConfig | None = None,
    calibration_feeds: Iterable[dict[str, np.ndarray]] | None = None,
) -> Path:
    """Quantize an exported decoder with ONNX Runtime (pre-processing first).

    Args:
        src: the fp32 ``.onnx`` decoder.
        dst: where to write the quantized ``.onnx``.
        config: what to do (default: ``QuantizeConfig()``, dynamic int8 with s8 weights).
        calibration_feeds: input dicts for the decoder (static mode only; required there).

    Returns:
        ``dst``.
    """
    config = QuantizeConfig() if config is None else config
    if not isinstance(config, QuantizeConfig):
        raise TypeError(f"config must be a QuantizeConfig, got {type(config).__name__}")
    src = check_onnx_file(src, "src")
    if not isinstance(dst, (str, os.PathLike)):
        raise TypeError(f"dst must be a str or PathLike, got {type(dst).__name__}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    feeds = None
    if config.mode == "static":
        if calibration_feeds is None:
            raise ValueError("calibration_feeds are required for mode='static'")
        feeds = list(calibration_feeds)
        if not feeds or not all(isinstance(f, dict) for f in feeds):
            raise ValueError("calibration_feeds must be a non-empty iterable of input dicts")
    meta = read_metadata(src)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    # The quantizer warns through the root logger (e.g. about s8 activations in QOperator
    # format, a variant we time on purpose); keep those to errors for the call.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        _quantize(src, dst, config, feeds)
    finally:
        root.setLevel(level)
    set_metadata(dst, {**meta, "quantization": str(config.to_dict())})
    return dst


def _quantize(src: Path, dst: Path, config: QuantizeConfig, feeds) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )

    # The calibrators print progress on stdout; a library call stays quiet.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        pre = Path(tmp) / "pre.onnx"
        preprocess(src, pre)
        _ensure_names(pre)
        if config.mode == "weight_only":
            _weight_only(pre, dst, config)
        else:
            nodes = weight_nodes(pre, config.quantize_embeddings)
            ops = ["MatMul", "Gather"] if config.quantize_embeddings else ["MatMul"]
            if config.mode == "dynamic":
                quantize_dynamic(
                    str(pre),
                    str(dst),
                    op_types_to_quantize=ops,
                    per_channel=config.per_channel,
                    weight_type=_qtype(config.weight_type),
                    nodes_to_quantize=nodes,
                )
                if config.quantize_embeddings:
                    share_tied_table(dst)
            else:
                method = {
                    "minmax": CalibrationMethod.MinMax,
                    "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile,
                }[config.calibration]
                fmt = QuantFormat.QDQ if config.quant_format == "qdq" else QuantFormat.QOperator
                quantize_static(
                    str(pre),
                    str(dst),
                    _FeedReader(feeds),
                    quant_format=fmt,
                    op_types_to_quantize=ops,
                    per_channel=config.per_channel,
                    activation_type=_qtype(config.activation_type),
                    weight_type=_qtype(config.weight_type),
                    nodes_to_quantize=nodes,
                    calibrate_method=method,
                    # Entropy/percentile histograms are collected per tensor in one pass.
                    extra_options={"CalibMovingAverage": False},
                )


def _weight_only(src: Path, dst: Path, config: QuantizeConfig) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    # MatMulNBits takes 4 or 8 bits; its Gather counterpart only 4.
    embed = config.quantize_embeddings and config.bits == 4
    ops: tuple[str, ...] = ("MatMul", "Gather") if embed else ("MatMul",)
    # Gather tables are (vocab, dim): blocks run along dim (axis 1), like a MatMul's K.
    axes = (("MatMul", 0), ("Gather", 1))
    algo = DefaultWeightOnlyQuantConfig(
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level,
        op_types_to_quantize=ops,
        quant_axes=axes,
        bits=config.bits,
    )
    q = MatMulNBitsQuantizer(
        str(src),
        bits=config.bits,
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level,
        op_types_to_quantize=ops,
        quant_axes=axes,
        algo_config=algo,
    )
    q.process()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "wo.onnx"
        q.model.save_model_to_file(str(out), use_external_data_format=False)
        shutil.copyfile(out, dst)
    if embed and config.symmetric:
        share_tied_table_nbits(dst)


def _deq(q: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) - zp.astype(np.float32)) * scale.astype(np.float32)


def share_tied_table(path: str | os.PathLike) -> int:
    """Let a quantized embedding ``Gather`` read the tied output head's int8 matrix, in place.

    A tied model's token table is both the embedding (``Gather`` over ``[V, C]``) and the head
    (``MatMul`` by its transpose ``[C, V]``); pre-processing folds the transpose into a second
    initializer, so the quantized file stores the table twice. This rewrites ``Gather(T_q,
    ids)`` into ``Transpose(Gather(B_q, ids, axis=1))`` with the head's scale and zero point,
    when the two dequantized tables agree within their quantization steps, and drops ``T_q``.

    Args:
        path: a dynamically quantized ``.onnx`` file (per-tensor weight scales).

    Returns:
        How many tables were shared (0 when no tied pair was found).
    """
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name])
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    heads = []  # (B_q, scale, zp) of integer matmuls by a constant [C, V] with scalar scale
    for n in g.node:
        if n.op_type == "MatMulInteger" and n.input[1] in inits and len(n.input) > 3:
            scale = n.input[1][: -len("_quantized")] + "_scale"
            if scale in inits and arr(scale).size == 1 and n.input[3] in inits:
                heads.append((n.input[1], scale, n.input[3]))
    shared = 0
    for n in list(g.node):
        if n.op_type != "Gather" or n.input[0] not in inits:
            continue
        deqs = consumers.get(n.output[0], [])
        if len(deqs) != 1 or deqs[0].op_type != "DequantizeLinear":
            continue
        dq = deqs[0]
        if dq.input[1] not in inits or arr(dq.input[1]).size != 1 or len(dq.input) < 3:
            continue
        table = _deq(arr(n.input[0]), arr(dq.input[1]), arr(dq.input[2]))
        for bq, bs, bz in heads:
            b = arr(bq)
            if b.shape != table.shape[::-1]:
                continue
            step = float(arr(dq.input[1])) + float(arr(bs))
            if not np.allclose(_deq(b, arr(bs), arr(bz)).T, table, rtol=0, atol=step):
                continue
            old = n.input[0]
            mid = n.output[0] + "_shared"
            n.input[0] = bq
            n.output[0] = mid
            del n.attribute[:]
            n.attribute.append(helper.make_attribute("axis", 1))
            dq.input[1], dq.input[2] = bs, bz
            tr = helper.make_node(
                "Transpose", [mid], [dq.input[0]], name=n.name + "_shared_transpose", perm=[1, 2, 0]
            )
            nodes = list(g.node)  # the edits above are done: copying the nodes is safe
            at = next(i for i, m in enumerate(nodes) if m.output[0] == mid)
            nodes.insert(at + 1, tr)
            del g.node[:]
            g.node.extend(nodes)
            if old not in {i for m in g.node for i in m.input}:
                g.initializer.remove(inits.pop(old))
            shared = 1
            break
        if shared:  # one token table per model; the node references are stale after this
            break
    if shared:
        used = {i for m in g.node for i in m.input}
        for name in list(inits):
            if name not in used and name.endswith(("_scale", "_zero_point")):
                g.initializer.remove(inits.pop(name))
        onnx.save(proto, str(path))
    return shared


def _unpack_nbits4(b: np.ndarray) -> np.ndarray:
    # MatMulNBits 4-bit blobs: two values a byte, low nibble first, zero point 8 (symmetric).
    lo, hi = (b & 0x0F).astype(np.int16), (b >> 4).astype(np.int16)
    return np.stack([lo, hi], axis=-1).reshape(*b.shape[:-1], b.shape[-1] * 2) - 8


def share_tied_table_nbits(path: str | os.PathLike) -> int:
    """Let the 4-bit token ``GatherBlockQuantized`` read the tied head's ``MatMulNBits`` blob.

    ``MatMulNBits`` stores the head as ``[V, blocks, block/2]`` bytes with an implicit zero
    point of 8, which ``GatherBlockQuantized`` reads directly as uint8 data with ``bits=4``
    (gather axis 0, quantize axis 2); a ``Reshape`` restores ``[..., C]``. Applied only when
    both tables dequantize to the same values; the separate int4 table is dropped.

    Args:
        path: a 4-bit weight-only ``.onnx`` file, edited in place.

    Returns:
        1 if the table was shared, else 0.
    """
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name])
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}
    gathers = [
        n
        for n in g.node
        if n.op_type == "GatherBlockQuantized"
        and len(n.input) == 3
        and n.input[0] in inits
        and attrs(n).get("gather_axis", 0) == 0
    ]
    heads = [
        n
        for n in g.node
        if n.op_type == "MatMulNBits"
        and len(n.input) == 3
        and n.input[1] in inits
        and attrs(n).get("bits") == 4
    ]
    for gq in gathers:
        table = arr(gq.input[0]).astype(np.float32)
        gs = arr(gq.input[2]).astype(np.float32)
        block = int(attrs(gq).get("block_size", 128))
        if table.ndim != 2 or attrs(gq).get("quantize_axis", 1) != 1:
            continue
        v, c = table.shape
        deq_t = (table.reshape(v, c // block, block) * gs[:, :, None]).reshape(v, c)
        for mm in heads:
            b = arr(mm.input[1])
            if b.shape[0] != v or attrs(mm).get("block_size") != block or attrs(mm).get("K") != c:
                continue
            s = arr(mm.input[2]).astype(np.float32).reshape(v, -1)
            deq_b = (_unpack_nbits4(b)[:, :, :block] * s[:, :, None]).reshape(v, -1)[:, :c]
            if not np.allclose(deq_b, deq_t, rtol=0, atol=1e-6 * float(np.abs(deq_t).max())):
                continue
            scales = numpy_helper.from_array(s.reshape(v, -1, 1), gq.input[2] + "_tied")
            shape = numpy_helper.from_array(
                np.array([0] * 2 + [-1], np.int64), gq.output[0] + "_tied_shape"
            )
            g.initializer.extend([scales, shape])
            blk = gq.output[0] + "_tied_blocks"
            new = [
                helper.make_node(
                    "GatherBlockQuantized",
                    [mm.input[1], gq.input[1], scales.name],
                    [blk],
                    name=gq.name + "_tied",
                    domain="com.microsoft",
                    gather_axis=0,
                    quantize_axis=2,
                    block_size=block,
                    bits=4,
                ),
                helper.make_node(
                    "Reshape", [blk, shape.name], [gq.output[0]], name=gq.name + "_tied_reshape"
                ),
            ]
            old_inputs = (gq.input[0], gq.input[2])
            nodes = list(g.node)
            at = next(i for i, n in enumerate(nodes) if n.name == gq.name)
            nodes[at : at + 1] = new
            del g.node[:]
            g.node.extend(nodes)
            used = {i for n in g.node for i in n.input}
            for name in old_inputs:
                if name not in used:
                    g.initializer.remove(inits.pop(name))
            onnx.save(proto, str(path))
            return 1
    return 0
