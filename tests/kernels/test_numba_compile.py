"""One compiled copy of each Numba function on the decode paths.

A constant that one jitted function passes to another (``0``, ``False``, an activation
code) is typed as a literal, and Numba compiles the callee and its whole call tree once more
for each such value. The float32 GPT-2 decoder step compiled ``_gemv_rows`` six times and
took 52 s to compile on a cold cache (20 s without the copies); the ``SimpleTransformerModel``
step compiled ``_epilogue`` five times (30 s, 13 s without). Each case runs in a fresh
process with an empty Numba cache, since a function loaded from the cache never compiles its
callees and their signatures stay empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

ROOT = Path(__file__).resolve().parents[2]

# Prints "<module>.<function> <signatures> <literal-typed signatures>" for every function
# compiled in the modules listed in MODULES.
_REPORT = """
import importlib
for mod in MODULES:
    m = importlib.import_module(mod)
    for name in dir(m):
        f = getattr(m, name)
        if getattr(f, "py_func", None) is not None and f.py_func.__module__ == mod:
            lit = sum("Literal" in str(s) for s in f.signatures)
            print(f"{mod.rsplit('.', 1)[1]}.{name}", len(f.signatures), lit)
"""

_HF_DECODER = """
import numpy as np
from ryzen_opt.kernels.numba import decoder_step as ds
from ryzen_opt.optimization import families
from tests.optimizer.hf_models import tiny
MODULES = ["ryzen_opt.kernels.numba.decoder_step"]
from ryzen_opt.kernels.numba import warmup
warmup(("decoder_step",))  # a synthetic model: the real ones below must add no signature
for family in ("gpt2", "llama"):
    model = tiny(family)
    lay = families.find(model)[0].layout(model)
    for weights in ds.WEIGHTS:
        dec = ds.NumbaDecoder(lay, weights)  # parallel=None: both modes run (calibrate)
        kc, vc = lay.new_cache(2, 8)
        dec.step(np.array([1, 2]), kc.numpy(), vc.numpy(), 0, np.array([0, 0]))
        dec.greedy(np.array([1, 2]), kc.numpy(), vc.numpy(), 1, np.array([0, 0]), 3)
"""

_STM_DECODE = """
import torch
from ryzen_opt.kernels.numba.matmul import matmul
from ryzen_opt.models.config import ModelConfig
from ryzen_opt.models.model import SimpleTransformerModel
from ryzen_opt.optimization.fastpaths.cpu import NumbaFusedDecode
MODULES = [
    "ryzen_opt.kernels.numba.decode_step",
    "ryzen_opt.kernels.numba._matmul_rows",
]
from ryzen_opt.kernels.numba import warmup
warmup(("decode_step",))
cfg = ModelConfig(vocab_size=97, embedding_dim=40, num_heads=5, num_layers=2, ff_dim=70,
                  max_seq_len=24)
model = SimpleTransformerModel(cfg).eval()
ids = torch.randint(0, 97, (3, 9))
with torch.no_grad():
    _, cache = model(ids[:, :7])
    for mode in ("serial", "pool"):
        NumbaFusedDecode(mode)(model, ids[:, 7:8], cache, 7)
# the decode-size matmuls, both weight layouts, with and without an epilogue
a, w = torch.randn(2, 300), torch.randn(600, 300)
for b in (w.t(), w.t().contiguous()):
    matmul(a, b)
    matmul(a, b, bias=torch.randn(600), activation="gelu")
"""


def _counts(script: str, tmp_path) -> dict[str, tuple[int, int]]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", script + _REPORT], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = (line.split() for line in run.stdout.splitlines())
    return {name: (int(n), int(lit)) for name, n, lit in rows}


def test_hf_decoder_step_compiles_each_function_once(tmp_path):
    """Every float32/int8/bf16 model of both families shares one compiled copy of each
    function (``_rows_q``: one per narrow weight type, int8 and bf16), the one that
    ``warmup(("decoder_step",))`` compiled from its synthetic model."""
    counts = _counts(_HF_DECODER, tmp_path)
    assert counts["decoder_step._step"][0] == 1, counts
    assert counts["decoder_step._greedy"][0] == 1, counts
    assert counts["decoder_step._gemv_rows"][0] == 1, counts
    assert all(lit == 0 for _, lit in counts.values()), counts
    want = {"decoder_step._rows_q": 2}
    assert all(n <= want.get(name, 1) for name, (n, _) in counts.items()), counts


def test_stm_decode_step_and_decode_matmul_compile_each_function_once(tmp_path):
    """Likewise for the ``SimpleTransformerModel`` step (after ``warmup(("decode_step",))``)
    and the decode-size matmuls."""
    counts = _counts(_STM_DECODE, tmp_path)
    assert counts["decode_step._decode_step"][0] == 1, counts
    assert counts["decode_step._greedy_steps"][0] == 1, counts
    assert counts["_matmul_rows._epilogue"][0] >= 1, counts
    assert all(lit == 0 for _, lit in counts.values()), counts
    assert all(n <= 1 for n, _ in counts.values()), counts


def test_warmup_names_unknown_ops():
    from ryzen_opt.kernels.numba import warmup

    with pytest.raises(ValueError, match="ops must be a tuple of names from .*'flash'"):
        warmup(("decoder_step", "flash"))
    # A bare string is not a tuple of names (it would iterate its letters).
    with pytest.raises(ValueError, match="ops must be a tuple of names"):
        warmup("matmul")
    with pytest.raises(ValueError, match="progress must be None or a bool"):
        warmup(("layer_norm",), progress="yes")


def test_warmup_reports_each_op_when_asked(capsys):
    from ryzen_opt.kernels.numba import warmup

    warmup(("layer_norm", "matmul"), progress=True)
    err = capsys.readouterr().err.splitlines()
    # In the module's order, a line as each op starts and one with its seconds.
    assert err[0] == "warmup 1/2 matmul ..." and err[2] == "warmup 2/2 layer_norm ..."
    assert err[1].startswith("warmup 1/2 matmul: ") and err[1].endswith(" s")
    warmup(("layer_norm",), progress=False)
    assert capsys.readouterr().err == ""


def test_warmup_command_line(capsys):
    from ryzen_opt.kernels.numba.__main__ import main

    assert main(["--ops", "layer_norm"]) == 0
    out = capsys.readouterr()
    assert "warmup 1/1 layer_norm" in out.err and "1 op(s) compiled or loaded" in out.out
    with pytest.raises(SystemExit) as e:
        main(["--ops", "layer_norm,flash"])
    assert e.value.code == 2 and "--ops must name ops" in capsys.readouterr().err
