"""ONNX export of ``SimpleTransformerModel`` as an incremental decoder with a KV cache.

The exported graph takes ``input_ids`` and ``position_ids`` (both ``(batch, seq)`` int64) and,
with ``with_kv_cache=True``, ``past_key_<i>`` / ``past_value_<i>`` for every layer
(``(batch, heads_i, past, head_dim)`` float32; ``past`` may be 0 on the first step). It
returns ``logits`` ``(batch, seq, vocab)`` and ``present_key_<i>`` / ``present_value_<i>``
``(batch, heads_i, past + seq, head_dim)``. Batch, sequence and past lengths are dynamic.

The wrapper calls the model's submodules directly (the model's own ``forward`` derives
positions from the cache length and has no ``position_ids`` argument), so ``models/`` stays
untouched. Attention is written as matmul/softmax with an explicit causal mask offset by the
past length: one graph serves prefill, chunked prefill and single-token decode.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import logging
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from ryzen_opt.models.attention import causal_self_attention, explicit_core

INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
LOGITS = "logits"


def past_names(num_layers: int) -> list[str]:
    """Names of the past key/value inputs, in graph order (key then value per layer)."""
    return [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """Names of the present key/value outputs, in graph order."""
    return [f"present_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def _check_model(model: nn.Module) -> None:
    needed = ("tok_emb", "pos_emb", "blocks", "ln_f", "head", "config")
    if not isinstance(model, nn.Module) or any(not hasattr(model, n) for n in needed):
        raise TypeError(
            "model must be a SimpleTransformerModel (or a pruned one from ryzen_opt.compress), "
            f"got {type(model).__name__}"
        )


class DecoderWrapper(nn.Module):
    """Flat-tensor decoder around a ``SimpleTransformerModel`` for export.

    Args:
        model: the model (its weights are shared, not copied).
        with_kv_cache: take past key/values and return present ones.
    """

    def __init__(self, model: nn.Module, with_kv_cache: bool = True) -> None:
        super().__init__()
        _check_model(model)
        self.model = model
        self.with_kv_cache = with_kv_cache

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        m = self.model
        x = m.tok_emb(input_ids) + m.pos_emb(position_ids)
        presents: list[torch.Tensor] = []
        for i, block in enumerate(m.blocks):
            kv = (past[2 * i], past[2 * i + 1]) if self.with_kv_cache else None
            # The explicit core, not the model's SDPA calls: those pick is_causal or a mask
            # by the input's shape in Python, which the exporter would freeze into the graph;
            # here the mask is computed from the shapes, so one graph serves every length.
            a, (k, v) = causal_self_attention(
                block.attn, block.ln1(x), kv, core=explicit_core, dropout_p=0.0
            )
            x = x + a
            x = x + block.mlp(block.ln2(x))
            presents += [k, v]
        logits = m.head(m.ln_f(x))
        if not self.with_kv_cache:
            return logits
        return (logits, *presents)


def layer_heads(model: nn.Module) -> list[int]:
    """Attention heads of each layer (pruned models may differ per layer)."""
    return [int(b.attn.num_heads) for b in model.blocks]


_TMP_SUFFIX = ".tmp"


def _temp_name(path: Path) -> Path:
    # Hidden, in the destination's folder (os.replace is atomic only within one file
    # system), and tagged with the writer's pid so a later writer can tell a dead one's.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but not ours, or cannot tell: keep its file
    return True


def _remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporaries of ``path`` left by writers that were killed (their pid is gone)."""
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{_TMP_SUFFIX}*"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if not parts or not parts[0].isdigit() or int(parts[0]) == os.getpid():
            continue
        if not _pid_alive(int(parts[0])):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def check_output_path(path: str | os.PathLike, name: str = "path", force: bool = True) -> Path:
    """``path`` as a file path one may write, or a ``ValueError`` naming ``name``.

    Refuses an empty path, an existing folder, a parent that is a file, and (unless
    ``force``) an existing file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or Path, got {type(path).__name__}")
    if str(path) == "":
        raise ValueError(f"{name} must name a file, got an empty path")
    p = Path(path)
    if p.is_dir():
        raise ValueError(
            f"{name} {str(p)!r} is a folder; give a file path such as {str(p / 'model.onnx')!r}"
        )
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{name} {str(p)!r}: {str(parent)!r} is a file, not a folder")
    if p.exists() and not force:
        raise ValueError(f"{name} {str(p)!r} already exists (--force overwrites it)")
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A writer that fails (or is interrupted) leaves ``path`` as it was: absent, or the old
    file intact. Its temporary, and a ``.data`` external-weights file beside it, are deleted;
    temporaries of writers killed outright (no chance to clean up) are deleted by the next
    write to the same ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    with_kv_cache: bool = True,
    opset: int | None = None,
) -> Path:
    """Export ``model`` to an ONNX decoder file (dynamo exporter, weights inside the file).

    Args:
        model: a ``SimpleTransformerModel`` (or a structurally pruned one); exported on CPU in
            fp32, in eval mode, without changing the caller's model.
        path: the ``.onnx`` file to write (parent folders are created). It is written under
            a temporary name in the same folder and renamed when complete, so an export that
            fails or is killed never leaves a partial file there, nor destroys an old one.
        with_kv_cache: export past/present key-value inputs and outputs (an incremental
            decoder); ``False`` exports a full-sequence model returning logits only.
        opset: ONNX opset (``None``: the exporter's default). Must be >= 18.

    Returns:
        The path of the written file, which passes ``onnx.checker.check_model(full_check=True)``.
    """
    _check_model(model)
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    if not isinstance(with_kv_cache, bool):
        raise TypeError(f"with_kv_cache must be a bool, got {with_kv_cache!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 18):
        raise ValueError(f"opset must be None or an int >= 18, got {opset!r}")
    path = check_output_path(path)

    cpu = copy.deepcopy(model).float().cpu().eval()
    wrapper = DecoderWrapper(cpu, with_kv_cache).eval()
    cfg = cpu.config
    n_layers = len(cpu.blocks)
    heads = layer_heads(cpu)
    head_dim = int(cpu.blocks[0].attn.head_dim)
    # Example sizes > 1 and distinct: torch.export specializes dimensions of size 0/1.
    b, t, p = 2, 3, min(5, max(2, cfg.max_seq_len - 4))
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    pos = torch.arange(p, p + t)[None].expand(b, t).contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=cfg.max_seq_len)
    past_len = torch.export.Dim("past", min=0, max=cfg.max_seq_len)
    args: list[torch.Tensor] = [ids, pos]
    past_shapes: list = []
    names_in = [INPUT_IDS, POSITION_IDS]
    names_out = [LOGITS]
    if with_kv_cache:
        for i in range(n_layers):
            for _ in ("key", "value"):
                args.append(torch.randn(b, heads[i], p, head_dim))
                past_shapes.append({0: batch, 2: past_len})
        names_in += past_names(n_layers)
        names_out += present_names(n_layers)
    else:
        args[1] = torch.arange(t)[None].expand(b, t).contiguous()
    shapes: tuple = ({0: batch, 1: seq}, {0: batch, 1: seq})
    if with_kv_cache:  # *past is one varargs entry: its shapes form one nested tuple
        shapes = (*shapes, tuple(past_shapes))
    with atomic_output(path) as tmp:
        _export(wrapper, tuple(args), tmp, names_in, names_out, opset, shapes)
        meta = {
            "max_seq_len": cfg.max_seq_len,
            "vocab_size": cfg.vocab_size,
            "num_layers": n_layers,
            "heads": ",".join(map(str, heads)),
            "head_dim": head_dim,
            "producer": "ryzen_opt.compress.export_onnx",
        }
        set_metadata(tmp, meta)
    return path


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter logs one warning per torchvision op when torchvision is absent (4 lines
    # on every export, nothing to act on); errors still show.
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _export(wrapper, args, tmp: Path, names_in, names_out, opset, shapes) -> None:
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            wrapper,
            args,
            str(tmp),
            input_names=names_in,
            output_names=names_out,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            dynamic_shapes=shapes,
            optimize=True,
            verbose=False,
        )


def set_metadata(path: str | Path, meta: dict) -> None:
    """Write ``meta`` (str-able values) into the ONNX file's metadata_props, in place."""
    proto = onnx.load(str(path))
    kept = {p.key: p.value for p in proto.metadata_props}
    kept.update({k: str(v) for k, v in meta.items()})
    del proto.metadata_props[:]
    for k, v in kept.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file as a dict (weights are not loaded)."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
