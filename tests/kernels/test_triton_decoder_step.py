"""Triton decoder step (Hugging Face families) against ``reference_step`` in float64, over
consecutive steps with left padding (interpreter on CPU; the GPU where there is one)."""

import dataclasses

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("transformers")

from ryzen_opt.kernels.triton import _common  # noqa: E402
from ryzen_opt.kernels.triton import decoder_step as tds  # noqa: E402
from ryzen_opt.optimization import families  # noqa: E402
from ryzen_opt.optimization.fastpaths.decoder_layout import reference_step  # noqa: E402
from tests.assertions import TOL, assert_close_rel  # noqa: E402
from tests.optimizer.hf_models import tiny  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison():
    # torch.empty fills NaN in deterministic mode: an output left unwritten fails the check.
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _layout(model):
    fam, why = families.find(model)
    assert why is None, why
    return fam.layout(model)


def _double(obj):
    """A copy of a layout (or one of its parts) with every float tensor in float64 (the
    families refuse a float64 model; the reference reads the same weights widened)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().double() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_double(o) for o in obj)
    if dataclasses.is_dataclass(obj):
        keep = ("rope_inv_freq",)  # float32 in the model too
        return dataclasses.replace(
            obj,
            **{
                f.name: _double(getattr(obj, f.name))
                for f in dataclasses.fields(obj)
                if f.name not in keep
            },
        )
    return obj


def _stress(n, k, batch, *, sms, accumulators=1, transposed=False, divides=None):
    """Short K tiles and three K splits: several tiles a split, a ragged last split and (where
    K is short) an empty one; rows in groups of 2 on the FMA path."""
    c = tds._config(
        n, k, batch, sms=sms, accumulators=accumulators, transposed=transposed, divides=divides
    )
    if c.dot:
        return dataclasses.replace(c, block_k=16, split_k=3)
    block_n = 16 if divides is None else min(16, divides & -divides)  # fewer programs
    return dataclasses.replace(c, block_b=min(c.block_b, 2), block_n=block_n, block_k=32, split_k=3)


def _stress_attn(batch, kv_heads, head_dim, t_max, *, sms):
    return tds.AttnConfig(block_t=16, splits=3)  # t >= 5: one to two tiles a split


def _ramp_norms(model):
    # Non-trivial norm weights and biases (HF initialises them to ones and zeros).
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or "ln_f" in name:
                p.add_((0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))


def _run_steps(family, dtype, starts, t0, steps, t_max, config, attn_config, **overrides):
    model = tiny(family, dtype, **overrides)
    _ramp_norms(model)
    ref = _double(_layout(model))
    lay = _layout(model.to(DEVICE))
    b = len(starts)
    g = torch.Generator().manual_seed(7)
    # The prompt's keys and values: random, already in the cache (both in the model dtype).
    shape = (lay.num_layers, b, lay.kv_heads, t_max, lay.head_dim)
    kc0 = torch.randn(shape, generator=g).to(dtype)
    vc0 = torch.randn(shape, generator=g).to(dtype)
    kc, vc = kc0.to(DEVICE).contiguous(), vc0.to(DEVICE).contiguous()
    rkc, rvc = kc0.double(), vc0.double()
    start = torch.tensor(starts, dtype=torch.int64)
    ws = tds.DecoderWorkspace(lay, b, config=config, attn_config=attn_config)
    tol = TOL[dtype]
    if dtype == torch.bfloat16 and _common.INTERPRET:
        # Triton 3.9's interpreter truncates fp32 -> bf16 casts (round toward zero: mean
        # relative error 2.7e-3 against 1.4e-3 for round-to-nearest, measured), so each
        # rounding point of the step errs twice as much as on the GPU: llama measured 1.06e-2
        # against float64, where torch's own bf16 reference_step is at 4.9e-3.
        tol = 2 * tol
    for step in range(steps):
        ids = torch.randint(1, lay.vocab, (b,), generator=g)
        t = torch.tensor([t0 + step])
        with torch.no_grad():
            want = reference_step(ref, ids, rkc, rvc, t, start)
        out = tds.decoder_step(lay, ids.to(DEVICE), kc, vc, t.to(DEVICE), start.to(DEVICE), ws)
        assert out is ws.logits
        assert_close_rel(out, want, tol, f"{family} {dtype} step {step} logits")
    written = slice(t0, t0 + steps)
    assert_close_rel(kc[:, :, :, written], rkc[:, :, :, written], tol, "k cache")
    assert_close_rel(vc[:, :, :, written], rvc[:, :, :, written], tol, "v cache")
    # Only slot t is written: the prompt's slots are as they were.
    assert torch.equal(kc[:, :, :, :t0].cpu(), kc0[:, :, :, :t0])
    assert torch.equal(vc[:, :, :, t0 + steps :].cpu(), vc0[:, :, :, t0 + steps :])


DEFAULT = (tds._config, tds._attn_config)
STRESS = (_stress, _stress_attn)
ONE_LAYER = dict(num_hidden_layers=1)  # the interpreter runs a split program in ~30 ms


@pytest.mark.parametrize(
    "family, dtype, starts, t_max, configs, overrides",
    [
        # batch 1; head_dim 16, 4 heads over 2 kv heads, cache of 21 slots (tiles of 32)
        ("llama", torch.float32, [0], 21, DEFAULT, {}),
        # left padding, split-K everywhere, rows in groups of 2, three attention splits
        ("llama", torch.float32, [0, 2, 4], 21, STRESS, ONE_LAYER),
        # head_dim 32, one kv head for 3 heads; hidden 96 and intermediate 100 are no
        # multiples of the tiles (128, and 32 under STRESS)
        (
            "llama",
            torch.float32,
            [3, 0, 1],
            37,
            DEFAULT,
            dict(
                hidden_size=96,
                num_attention_heads=3,
                num_key_value_heads=1,
                intermediate_size=100,
                num_hidden_layers=1,
            ),
        ),
        # head_dim 64
        (
            "llama",
            torch.float16,
            [1, 0, 4],
            37,
            STRESS,
            dict(
                hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1
            ),
        ),
        ("llama", torch.bfloat16, [0, 2, 4], 21, DEFAULT, {}),
        # Qwen2: q/k/v biases, tied head
        ("qwen2", torch.float16, [0, 2, 4], 21, STRESS, ONE_LAYER),
        # GPT-2: LayerNorm, learned positions, Conv1D (in, out) strided weights, GELU-tanh
        ("gpt2", torch.float32, [0, 2, 4], 21, STRESS, dict(n_layer=1)),
        ("gpt2", torch.float16, [2], 21, DEFAULT, {}),
        # 5 rows: the tl.dot path (rows padded to 16), default and split
        ("llama", torch.float32, [0, 1, 2, 3, 4], 21, DEFAULT, {}),
        ("gpt2", torch.bfloat16, [0, 1, 2, 3, 4], 21, STRESS, dict(n_layer=1)),
    ],
)
def test_steps_match_the_reference_step(family, dtype, starts, t_max, configs, overrides):
    _run_steps(
        family,
        dtype,
        starts,
        t0=5,
        steps=3,
        t_max=t_max,
        config=configs[0],
        attn_config=configs[1],
        **overrides,
    )


def test_config_fills_the_gpu_on_llama_1b_shapes():
    # Llama 1.2B: every matmul launches 2 programs per SM on the FMA path (a 16 KB weight
    # tile at most) and one per SM on the tl.dot path, at batch 1, 3 and 16.
    for batch in (1, 3, 16):
        for n, k, accs, div in [
            (3072, 2048, 1, 64),
            (2048, 2048, 1, None),
            (8192, 2048, 2, None),
            (2048, 8192, 1, None),
            (32000, 2048, 1, None),
        ]:
            c = tds._config(n, k, batch, sms=132, accumulators=accs, divides=div)
            programs = -(-n // c.block_n) * c.split_k * -(-batch // c.block_b)
            assert programs >= (132 if c.dot else 2 * 132), (n, k, batch, c)
            assert c.dot or c.block_b * c.block_n * c.block_k * accs <= 8192, c
            assert div is None or div % c.block_n == 0, c
    for batch in (1, 16):
        a = tds._attn_config(batch, 8, 64, 4096, sms=132)
        assert batch * 8 * a.splits >= 66 and a.splits * a.block_t <= 4096, a


def test_supports_gives_reasons():
    lay = _layout(tiny("llama").to(DEVICE))
    assert tds.supports(lay) is None
    narrow = tiny("llama", num_attention_heads=8, num_key_value_heads=8).to(DEVICE)
    assert "head_dim" in tds.supports(_layout(narrow))
    assert "dtype" in tds.supports(_double(lay))
    assert "family" in tds.supports(dataclasses.replace(lay, family="bert"))
    odd_norm = dataclasses.replace(lay.final_norm, kind="group")
    assert "norm kind" in tds.supports(dataclasses.replace(lay, final_norm=odd_norm))
    if DEVICE == "cuda" or not _common.INTERPRET:
        assert "CUDA" in tds.supports(_layout(tiny("llama")))  # a CPU model, no interpreter
    with pytest.raises(ValueError, match="layout: .*head_dim"):
        tds.DecoderWorkspace(_layout(narrow), 1)


def test_bad_arguments_name_the_argument():
    lay = _layout(tiny("llama").to(DEVICE))
    ws = tds.DecoderWorkspace(lay, 2)
    kc, vc = lay.new_cache(2, 8)
    ids = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    t = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="k_cache"):
        tds.decoder_step(lay, ids, kc[:, :1], vc, t, ids, ws)
    with pytest.raises(ValueError, match="start"):
        tds.decoder_step(lay, ids, kc, vc, t, ids[:1], ws)
