"""The Numba HF-decoder step and greedy loop against the layout contract's reference step,
computed in float64 on a float64 copy of the model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("numba")
pytest.importorskip("transformers")

from ryzen_opt.kernels.numba.decoder_step import NumbaDecoder, supports  # noqa: E402
from ryzen_opt.optimization import families  # noqa: E402
from ryzen_opt.optimization.fastpaths.decoder_layout import (  # noqa: E402
    Linear,
    reference_step,
)
from tests.assertions import TOL, assert_close_rel  # noqa: E402
from tests.optimizer.hf_models import VOCAB, tiny  # noqa: E402

FAMILIES = ["llama", "qwen2", "gpt2"]
STARTS = {1: [0], 3: [0, 2, 5]}  # left padding: first valid slot per row
PROMPT, T_MAX = 7, 24
# Per-output-channel int8 rounds each weight by up to scale/2 = max|w|/254: about 0.5% of a
# unit-variance row's output per matmul; measured 0.8-1.0% on the logits of the tiny models
# (two layers, five matmuls deep). Twice that is the bound.
INT8_TOL = 2e-2


def _double(obj, matrices=torch.float64):
    """A float64 copy of a layout (tensors copied, views kept as separate copies); the
    matrices of its linears first rounded to ``matrices``."""
    if isinstance(obj, Linear):
        w = obj.weight.detach().to(matrices).double()
        return dataclasses.replace(obj, weight=w, bias=_double(obj.bias))
    if isinstance(obj, torch.Tensor):
        return obj.detach().double() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_double(o, matrices) for o in obj)
    if dataclasses.is_dataclass(obj):
        kw = {f.name: _double(getattr(obj, f.name), matrices) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **kw)
    return obj


def _pair(family, matrices=torch.float64):
    model = tiny(family)
    lay = families.find(model)[0].layout(model)
    ref = _double(lay, matrices)
    # the contract's rotary frequencies stay float32 (HF computes the angles in float32)
    if lay.rope_inv_freq is not None:
        ref = dataclasses.replace(ref, rope_inv_freq=lay.rope_inv_freq)
    return model, lay, ref


def _ids(batch, steps, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, steps), generator=g)


def _rows(start, t):
    return [b for b, s in enumerate(start) if s <= t]  # rows past their left padding


def _steps_match(family, batch, weights, parallel, tol, matrices=torch.float64):
    _, lay, ref_lay = _pair(family, matrices)
    dec = NumbaDecoder(lay, weights, parallel=parallel)
    start = torch.tensor(STARTS[batch])
    kc, vc = lay.new_cache(batch, T_MAX)
    rk, rv = ref_lay.new_cache(batch, T_MAX)
    ids = _ids(batch, PROMPT + 3)
    errs = []
    for s in range(ids.shape[1]):
        out = dec.step(ids[:, s].numpy(), kc.numpy(), vc.numpy(), s, start.numpy())
        with torch.no_grad():
            ref = reference_step(ref_lay, ids[:, s], rk, rv, torch.tensor([s]), start)
        rows = _rows(STARTS[batch], s)
        assert np.isfinite(out).all()
        out_t = torch.from_numpy(out)[rows]
        errs.append(float((out_t.double() - ref[rows]).norm() / ref[rows].norm()))
        assert_close_rel(out_t, ref[rows], tol, f"{family} {weights} step {s} logits")
    for b, s0 in enumerate(STARTS[batch]):  # the slots each row attends to
        for name, c, r in (("k", kc, rk), ("v", vc, rv)):
            assert_close_rel(c[:, b, :, s0:], r[:, b, :, s0:], tol, f"{name}_cache row {b}")
    return max(errs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_steps_match_the_reference_with_left_padding(family, batch):
    _steps_match(family, batch, "fp32", parallel=batch == 3, tol=TOL[torch.float32])


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_serial_and_parallel_agree(family):
    _steps_match(family, 3, "fp32", parallel=False, tol=TOL[torch.float32])


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_error_against_the_fp32_reference_is_bounded(family):
    err = _steps_match(family, 3, "int8", parallel=True, tol=INT8_TOL)
    print(f"{family} int8 max relative logits error {err:.2e}")
    assert err > 1e-5  # the int8 weights are really read


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_steps_match_the_reference_with_bf16_rounded_matrices(family):
    # bf16 weights are widened exactly, so against a reference whose matrices were rounded
    # to bf16 the step is as exact as the float32 one.
    _steps_match(family, 3, "bf16", parallel=True, tol=TOL[torch.float32], matrices=torch.bfloat16)


def test_bf16_weights_are_really_read():
    # Against the unrounded float64 reference the bf16 step is off by the rounding of its
    # weights (about 2^-9 relative a weight), far above the float32 tolerance.
    with pytest.raises(AssertionError):
        _steps_match("qwen2", 1, "bf16", parallel=False, tol=TOL[torch.float32])


def _reference_greedy(lay, first, rk, rv, t0, start, n_new, eos, pad):
    """HF generate's greedy rule over reference steps: finished rows emit pad."""
    b = first.shape[0]
    done = torch.zeros(b, dtype=torch.bool)
    cur, out = first.clone(), torch.full((b, n_new), pad, dtype=torch.int64)
    for s in range(n_new):
        with torch.no_grad():
            logits = reference_step(lay, cur, rk, rv, torch.tensor([t0 + s]), start)
        tok = torch.where(done, torch.tensor(pad), logits.argmax(-1))
        done |= torch.isin(tok, torch.tensor(eos, dtype=torch.int64)) & ~done
        out[:, s], cur = tok, tok
        if done.all():
            return out, s + 1
    return out, n_new


def _prefilled(family, batch):
    _, lay, ref_lay = _pair(family)
    start = torch.tensor(STARTS[batch])
    kc, vc = lay.new_cache(batch, T_MAX)
    rk, rv = ref_lay.new_cache(batch, T_MAX)
    ids = _ids(batch, PROMPT)
    with torch.no_grad():
        for s in range(PROMPT - 1):
            reference_step(lay, ids[:, s], kc, vc, torch.tensor([s]), start)
            reference_step(ref_lay, ids[:, s], rk, rv, torch.tensor([s]), start)
    return lay, ref_lay, ids[:, -1], (kc, vc), (rk, rv), start


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_reference_steps_with_per_row_eos(family):
    n_new, pad = 10, 0
    lay, ref_lay, first, (kc, vc), (rk, rv), start = _prefilled(family, 3)
    t0 = PROMPT - 1
    free, _ = _reference_greedy(ref_lay, first, rk.clone(), rv.clone(), t0, start, n_new, [], pad)
    # Row 0 stops at its 3rd token; the others run on (unless they emit the same token).
    eos = [int(free[0, 2])]
    want, want_steps = _reference_greedy(ref_lay, first, rk, rv, t0, start, n_new, eos, pad)
    dec = NumbaDecoder(lay, "fp32", parallel=True)
    got, steps = dec.greedy(
        first.numpy(), kc.numpy(), vc.numpy(), t0, start.numpy(), n_new, eos, pad
    )
    assert steps == want_steps
    assert got.tolist() == want.tolist()
    assert (got[0, 3:] == pad).all()


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_greedy_stops_once_every_row_finished(family):
    n_new, pad = 10, 0
    lay, ref_lay, first, (kc, vc), (rk, rv), start = _prefilled(family, 3)
    t0 = PROMPT - 1
    free, _ = _reference_greedy(ref_lay, first, rk.clone(), rv.clone(), t0, start, n_new, [], pad)
    eos = sorted({int(v) for v in free[:, 1]})  # every row finishes by its 2nd token
    want, want_steps = _reference_greedy(ref_lay, first, rk, rv, t0, start, n_new, eos, pad)
    dec = NumbaDecoder(lay, "fp32", parallel=False)
    got, steps = dec.greedy(
        first.numpy(), kc.numpy(), vc.numpy(), t0, start.numpy(), n_new, eos, pad
    )
    assert steps == want_steps <= 2
    assert got.tolist() == want.tolist()


def test_fp32_reads_the_model_weights_in_place():
    for family in ("qwen2", "gpt2"):
        model, lay, _ = _pair(family)
        dec = NumbaDecoder(lay, "fp32")
        assert dec.owned_bytes == 0
        mats = dec._mats
        for i, layer in enumerate(lay.layers):
            for j, name in enumerate(("q", "k", "v", "o", "gate", "up", "down")):
                lin = getattr(layer, name)
                if lin is not None:
                    assert mats[i * 7 + j, 0] == lin.weight.data_ptr()
        assert mats[-1, 0] == lay.head.weight.data_ptr()
    # GPT-2's q/k/v are read inside the model's fused c_attn weight, not from a copy.
    w = model.transformer.h[0].attn.c_attn.weight
    lo, hi = w.data_ptr(), w.data_ptr() + w.numel() * 4
    assert all(lo <= mats[j, 0] < hi for j in range(3))


def test_replaced_parameters_are_detected():
    model, lay, _ = _pair("qwen2")  # the layout holds the Parameters themselves
    dec = NumbaDecoder(lay, "fp32")
    assert dec.current()
    w = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        w.data = w.data.clone()
    assert not dec.current()
    kc, vc = lay.new_cache(1, 4)
    with pytest.raises(RuntimeError, match="moved"):
        dec.step(np.array([1]), kc.numpy(), vc.numpy(), 0, np.array([0]))


@pytest.mark.parametrize("weights, dtype", [("int8", np.int8), ("bf16", np.uint16)])
def test_narrow_storage_is_a_quarter_or_half_of_the_fp32_matrices(weights, dtype):
    _, lay, _ = _pair("qwen2")
    dec = NumbaDecoder(lay, weights)
    assert dec.narrow.dtype == dtype and dec.scales.dtype == np.float32
    n = sum(lin.weight.numel() for lay_ in lay.layers for lin in _lins(lay_))
    n += lay.head.weight.numel()
    assert dec.narrow.size == n
    rows = sum(lin.out_features for lay_ in lay.layers for lin in _lins(lay_)) + lay.vocab
    assert dec.narrow.nbytes == n * dtype().itemsize  # 1/4 or 1/2 of the 4 * n fp32 bytes
    assert dec.owned_bytes == dec.narrow.nbytes + 4 * rows  # + one float32 scale a row
    assert (dec._mats[:, 6] != 0).all()  # every matrix, the head included, is narrow
    if weights == "bf16":  # the bits are torch's round-to-nearest-even bf16
        w = lay.layers[0].up.weight.detach()
        off = dec._mats[5, 0] - dec.narrow.ctypes.data
        got = dec.narrow[off // 2 : off // 2 + w.numel()]
        want = w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).ravel()
        assert np.array_equal(got, want)


def _lins(layer):
    return [
        lin
        for lin in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)
        if lin is not None
    ]


def test_unsupported_inputs_are_refused_with_the_reason():
    model = tiny("llama")
    lay = families.find(model)[0].layout(model)
    assert supports(lay) is None and supports(lay, "int8") is None
    assert supports(lay, "bf16") is None
    assert "weights='fp8'" in supports(lay, "fp8")
    with pytest.raises(ValueError, match="weights="):
        NumbaDecoder(lay, "fp8")
    half = tiny("llama", dtype=torch.bfloat16)
    why = supports(families.find(half)[0].layout(half))
    assert "torch.bfloat16" in why and "float32" in why
    dec = NumbaDecoder(lay)
    kc, vc = lay.new_cache(2, 8)
    with pytest.raises(ValueError, match="k_cache"):
        dec.step(np.array([1]), kc.numpy(), vc.numpy(), 0, np.array([0]))
    with pytest.raises(ValueError, match="t: "):
        dec.step(np.array([1, 2]), kc.numpy(), vc.numpy(), 8, np.array([0, 0]))
    with pytest.raises(ValueError, match="ids"):
        dec.step(np.array([1, VOCAB]), kc.numpy(), vc.numpy(), 0, np.array([0, 0]))
    # Torch tensors are read in place through .numpy().
    out = dec.step(torch.tensor([1, 2]), kc, vc, 0, torch.tensor([0, 0]))
    assert out.shape == (2, VOCAB) and kc[:, :, :, 0].abs().sum() > 0


def test_default_mode_is_chosen_by_timing_both():
    _, lay, _ = _pair("gpt2")
    dec = NumbaDecoder(lay)
    assert dec.parallel is None
    kc, vc = lay.new_cache(1, 4)
    dec.step(np.array([3]), kc.numpy(), vc.numpy(), 0, np.array([0]))
    assert dec.parallel in (True, False)
    times = dec.calibrate(repeats=1)
    assert set(times) == {"serial", "pool"} and dec.parallel == (times["pool"] < times["serial"])
