"""``OnnxGenerator``: incremental generation from an exported decoder with ONNX Runtime.

This module imports only numpy and onnxruntime (never torch or the rest of ryzen_opt), so the
file can be copied next to a ``.onnx`` model on an edge device and used on its own.

The decoder contract (written by :func:`ryzen_opt.compress.export_onnx`): inputs
``input_ids``, ``position_ids`` (int64 ``(batch, seq)``) and ``past_key_<i>`` /
``past_value_<i>`` (float32 ``(batch, heads, past, head_dim)``); outputs ``logits`` and
``present_key_<i>`` / ``present_value_<i>``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort


def _past_inputs(inputs: Sequence) -> list:
    past = [i for i in inputs if i.name.startswith("past_key_") or i.name.startswith("past_value_")]

    def key(i):
        kind, idx = i.name[len("past_") :].rsplit("_", 1)
        return int(idx), 0 if kind == "key" else 1

    return sorted(past, key=key)


def make_session(
    path: str | os.PathLike, threads: int | None = None, optimize: bool = True
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for ``path``; bad paths and files raise naming ``path``.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (``None``: ONNX Runtime's default, one per core).
        optimize: enable all graph optimizations (fusions); ``False`` runs the graph as stored.

    Returns:
        The session.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path {str(p)!r}: ONNX file does not exist")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types per failure
        raise ValueError(f"path {str(p)!r} is not a loadable ONNX model: {e}") from None


def sample_next_np(
    logits: np.ndarray,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """One id per row from ``(batch, vocab)`` logits: greedy at temperature 0, else sampled.

    Same rules as the PyTorch model's sampler: top-k keeps the k largest logits, top-p drops
    a token once the probability mass ranked before it reaches ``top_p``.
    """
    if temperature == 0:
        return logits.argmax(axis=-1).astype(np.int64)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-z, axis=-1, kind="stable")
        sz = np.take_along_axis(z, order, axis=-1)
        p = np.exp(sz - sz[:, :1])
        p /= p.sum(axis=-1, keepdims=True)
        drop_sorted = (np.cumsum(p, axis=-1) - p) >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        z = np.where(drop, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    idx = (np.cumsum(p, axis=-1) < u).sum(axis=-1)
    return np.minimum(idx, p.shape[-1] - 1).astype(np.int64)


class OnnxGenerator:
    """Greedy or sampled incremental generation from an exported decoder, on CPU.

    Args:
        path: the ``.onnx`` decoder (fp32 or quantized; any file with the decoder contract).
        threads: intra-op threads (``None``: ONNX Runtime's default).
        max_seq_len: the longest sequence the model accepts (``None``: read from the file's
            metadata, written by ``export_onnx``).

    Example:
        >>> gen = OnnxGenerator("model.onnx")  # doctest: +SKIP
        >>> gen.generate(np.array([[1, 5, 7]]), max_new_tokens=4, eos_id=2)  # doctest: +SKIP
    """

    def __init__(
        self, path: str | os.PathLike, threads: int | None = None, max_seq_len: int | None = None
    ) -> None:
        if max_seq_len is not None and (isinstance(max_seq_len, bool)
                                        or not isinstance(max_seq_len, int) or max_seq_len < 1):
            raise ValueError(f"max_seq_len must be None or an int >= 1, got {max_seq_len!r}")
        self.path = Path(path) if isinstance(path, (str, os.PathLike)) else path
        self.session = make_session(path, threads)
        names = [i.name for i in self.session.get_inputs()]
        if "input_ids" not in names or "position_ids" not in names:
            raise ValueError(
                f"path {str(self.path)!r}: the model must take input_ids and position_ids, "
                f"it takes {names}"
            )
        past = _past_inputs(self.session.get_inputs())
        self.past_names = [i.name for i in past]
        self.num_layers = len(past) // 2
        # (heads, head_dim) per past input; dims are static in exported decoders.
        self._past_dims = [(i.shape[1], i.shape[3]) for i in past]
        self.output_names = [o.name for o in self.session.get_outputs()]
        meta = self.session.get_modelmeta().custom_metadata_map
        if max_seq_len is None and "max_seq_len" in meta:
            max_seq_len = int(meta["max_seq_len"])
        self.max_seq_len = max_seq_len
        self.vocab_size = int(meta["vocab_size"]) if "vocab_size" in meta else None

    @property
    def has_cache(self) -> bool:
        return self.num_layers > 0

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past key/values for a first step of ``batch`` rows."""
        return [np.zeros((batch, h, 0, d), np.float32) for h, d in self._past_dims]

    def forward(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray | None = None,
        past: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call.

        Args:
            input_ids: ``(batch, seq)`` integer ids.
            position_ids: ``(batch, seq)`` positions (``None``: continue after ``past``).
            past: past key/values in graph order (``None``: an empty cache).

        Returns:
            ``(logits, present)``: ``(batch, seq, vocab)`` float32 logits and the grown cache.
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"input_ids must be a 2-D integer array with >= 1 column, got shape "
                f"{ids.shape} dtype {ids.dtype}"
            )
        b, t = ids.shape
        if past is None:
            past = self.empty_past(b)
        if len(past) != len(self.past_names):
            raise ValueError(f"past must hold {len(self.past_names)} arrays, got {len(past)}")
        start = past[0].shape[2] if past else 0
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(start, start + t, dtype=np.int64), (b, t))
        feeds = {"input_ids": ids.astype(np.int64, copy=False),
                 "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64)}
        feeds.update(zip(self.past_names, past, strict=True))
        out = self.session.run(None, feeds)
        return out[0], out[1:]

    def generate(
        self,
        input_ids: np.ndarray,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """Sample up to ``max_new_tokens`` ids after ``input_ids``.

        Args:
            input_ids: ``(batch, seq)`` prompt ids (one length for the batch).
            max_new_tokens: at most this many steps.
            temperature: 0 for greedy decoding, else the softmax temperature.
            top_k: keep only the ``top_k`` most likely tokens (sampling only).
            top_p: nucleus threshold in (0, 1] (sampling only).
            eos_id: a row that produces it stops (later positions repeat ``eos_id``);
                generation ends once every row has stopped.
            seed: seeds a private numpy generator, so sampling is deterministic for a seed.

        Returns:
            ``(batch, seq + n)`` int64 ids, ``n <= max_new_tokens``.
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be a 2-D integer array, got shape {ids.shape}")
        ids = ids.astype(np.int64)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
            max_new_tokens < 0
        ):
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
        if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)
                                   or eos_id < 0):
            raise ValueError(f"eos_id must be None or an id >= 0, got {eos_id!r}")
        if self.max_seq_len is not None and ids.shape[1] + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                f"max_seq_len={self.max_seq_len}"
            )
        if max_new_tokens == 0:
            return ids
        rng = np.random.default_rng(seed)
        b = ids.shape[0]
        done = np.zeros(b, dtype=bool)
        new: list[np.ndarray] = []
        seq = ids
        logits, past = self.forward(ids)
        for step in range(max_new_tokens):
            nxt = sample_next_np(logits[:, -1, :], temperature, top_k, top_p, rng)
            if eos_id is not None:
                nxt = np.where(done, eos_id, nxt)
                done |= nxt == eos_id
            new.append(nxt)
            if (eos_id is not None and done.all()) or step == max_new_tokens - 1:
                break
            seq = np.concatenate([seq, nxt[:, None]], axis=1)
            if self.has_cache:
                logits, past = self.forward(nxt[:, None], past=past)
            else:
                logits, _ = self.forward(seq)
        return np.concatenate([ids, np.stack(new, axis=1)], axis=1)
