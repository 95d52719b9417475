"""``OnnxGenerator``: incremental generation from an exported decoder with ONNX Runtime.

This module imports only numpy and onnxruntime (never torch or the rest of ryzen_opt), so the
file can be copied next to a ``.onnx`` model on an edge device and used on its own.

The decoder contract (written by :func:`ryzen_opt.compress.export_onnx`): inputs
``input_ids``, ``position_ids`` (int64 ``(batch, seq)``) and ``past_key_<i>`` /
``past_value_<i>`` (float32 ``(batch, heads, past, head_dim)``); outputs ``logits`` and
``present_key_<i>`` / ``present_value_<i>``.
"""

from __future__ import annotations

import math
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


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_)
    )


def check_sampling_args(
    max_new_tokens, temperature, top_k, top_p, eos_id, seed, vocab_size: int | None
) -> None:
    """Validate generation settings with the PyTorch model's rules; raise naming the argument.

    ``vocab_size`` bounds ``eos_id`` when the model's vocabulary is known.
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    # NaN fails every comparison and a temperature of inf flattens the distribution to
    # uniform: both are refused rather than sampled from.
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (_is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if eos_id is not None:
        hi = vocab_size if vocab_size is not None else 2**63
        if not _is_int(eos_id) or not 0 <= eos_id < hi:
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"eos_id must be None or an id in {bound}, got {eos_id!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be None or an int in [0, 2**64), got {seed!r}")


def check_ids(name: str, ids, vocab_size: int | None) -> np.ndarray:
    """``ids`` as a 2-D int64 array of token ids in ``[0, vocab_size)``; raise naming ``name``.

    ONNX Runtime's Gather wraps a negative id to the end of the table (-1 reads the last
    token's row) and fails with its own error past the end, so both are refused here.
    """
    a = np.asarray(ids)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, seq), got shape {a.shape}")
    if a.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one token per row, got seq length 0")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"{name} token ids must lie in {bound}, got min {lo} max {hi}")
    return a.astype(np.int64, copy=False)


def _meta_int(path, meta: dict, key: str) -> int | None:
    if key not in meta:
        return None
    raw = meta[key]
    try:
        v = int(raw)
    except ValueError:
        v = 0
    if v < 1 or str(v) != raw.strip():
        raise ValueError(
            f"path {str(path)!r}: metadata {key!r} must be an integer >= 1, got {raw[:80]!r}"
        )
    return v


def make_session(
    path: str | os.PathLike,
    threads: int | None = None,
    optimize: bool = True,
    spinning: bool = True,
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for ``path``; bad paths and files raise naming ``path``.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (``None``: ONNX Runtime's default, one per core).
        optimize: enable all graph optimizations (fusions); ``False`` runs the graph as stored.
        spinning: let idle intra-op threads spin for the next call (ONNX Runtime's default,
            lowest latency for one session). Turn it off when several sessions alternate:
            a spinning pool holds a core the other session needs.

    Returns:
        The session.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path {str(p)!r}: ONNX file does not exist")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    if not isinstance(spinning, bool):
        raise TypeError(f"spinning must be a bool, got {spinning!r}")
    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
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
    # Shift by the row maximum before dividing: with a tiny temperature (1e-320) the logits
    # themselves overflow to inf and every probability becomes NaN; shifted, the largest is
    # 0 and the rest go to -inf, the greedy limit.
    z = logits.astype(np.float64)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        z = (z - z.max(axis=-1, keepdims=True)) / temperature
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
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        max_seq_len: int | None = None,
        spinning: bool = True,
    ) -> None:
        if max_seq_len is not None and (not _is_int(max_seq_len) or max_seq_len < 1):
            raise ValueError(f"max_seq_len must be None or an int >= 1, got {max_seq_len!r}")
        self.path = Path(path) if isinstance(path, (str, os.PathLike)) else path
        self.session = make_session(path, threads, spinning=spinning)
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
        stored = _meta_int(self.path, meta, "max_seq_len")
        self.max_seq_len = int(max_seq_len) if max_seq_len is not None else stored
        vocab = _meta_int(self.path, meta, "vocab_size")
        if vocab is None:  # files from other exporters: the logits' static last dim
            last = self.session.get_outputs()[0].shape[-1] if self.output_names else None
            vocab = last if isinstance(last, int) and last > 0 else None
        self.vocab_size = vocab

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
        ids = check_ids("input_ids", input_ids, self.vocab_size)
        b, t = ids.shape
        if past is None:
            past = self.empty_past(b)
        if len(past) != len(self.past_names):
            raise ValueError(f"past must hold {len(self.past_names)} arrays, got {len(past)}")
        start = past[0].shape[2] if past else 0
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(start, start + t, dtype=np.int64), (b, t))
        feeds = {
            "input_ids": ids,
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
        }
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
        check_sampling_args(
            max_new_tokens, temperature, top_k, top_p, eos_id, seed, self.vocab_size
        )
        ids = check_ids("input_ids", input_ids, self.vocab_size)
        if self.max_seq_len is not None and ids.shape[1] + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                f"max_seq_len={self.max_seq_len}"
            )
        if max_new_tokens == 0:
            return ids.copy()
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
