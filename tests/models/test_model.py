import pytest
import torch

from ryzen_opt.models import ModelConfig, SimpleTransformerModel
from ryzen_opt.models.config import ConfigError

TINY = ModelConfig(
    vocab_size=64, embedding_dim=32, num_heads=4, num_layers=2, ff_dim=64, max_seq_len=40
)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SimpleTransformerModel(TINY).eval()


def test_default_config_matches_reference_configuration():
    c = ModelConfig()
    assert (
        c.vocab_size,
        c.embedding_dim,
        c.num_heads,
        c.num_layers,
        c.ff_dim,
        c.max_seq_len,
        c.dropout,
    ) == (2048, 256, 4, 2, 512, 128, 0.0)


def test_num_parameters_is_the_true_count_for_the_default_shape():
    m = SimpleTransformerModel()
    # tok 2048*256 + pos 128*256 + 2 blocks * 527,104 + final LN 512; the head is tied.
    assert m.num_parameters() == 524_288 + 32_768 + 2 * 527_104 + 512 == 1_611_776
    untied = SimpleTransformerModel(ModelConfig(tie_weights=False))
    assert untied.num_parameters() == 1_611_776 + 2048 * 256


def test_forward_with_cache_matches_full_forward(model):
    x = torch.randint(0, 64, (3, 17))
    full, _ = model(x)
    part1, cache = model(x[:, :10])
    part2, cache = model(x[:, 10:13], cache)  # a chunk after a cache
    part3, cache = model(x[:, 13:], cache)
    stitched = torch.cat([part1, part2, part3], dim=1)
    torch.testing.assert_close(stitched, full, rtol=1e-5, atol=1e-5)
    assert cache[0][0].shape == (3, 4, 17, 8)


def test_greedy_generation_with_cache_equals_without(model):
    x = torch.randint(0, 64, (4, 5))
    a = model.generate(x, 20)
    b = model.generate(x, 20, use_cache=False)
    assert torch.equal(a, b)
    assert a.shape == (4, 25) and torch.equal(a[:, :5], x)


def test_sampling_is_deterministic_for_a_seed_and_varies_across_seeds(model):
    x = torch.randint(0, 64, (2, 4))
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = model.generate(x, 15, seed=7, **kw)
    b = model.generate(x, 15, seed=7, **kw)
    c = model.generate(x, 15, seed=8, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_sampling_equals_greedy(model):
    x = torch.randint(0, 64, (2, 4))
    assert torch.equal(
        model.generate(x, 10, temperature=1.0, top_k=1, seed=0), model.generate(x, 10)
    )


def test_per_row_stopping_pads_finished_rows_with_eos(model):
    x = torch.randint(0, 64, (3, 4))
    greedy = model.generate(x, 12)
    eos = int(greedy[0, 6])  # row 0 emits this id at its third new step
    out = model.generate(x, 12, eos_id=eos)
    row = out[0, 4:].tolist()
    first = row.index(eos)
    assert all(t == eos for t in row[first:])
    for r in range(3):  # tokens before a row's first EOS are the greedy ones
        gen = out[r, 4:].tolist()
        stop = gen.index(eos) if eos in gen else len(gen)
        assert gen[:stop] == greedy[r, 4 : 4 + stop].tolist()


def test_generation_ends_early_when_every_row_stopped(model):
    x = torch.randint(0, 64, (1, 4))
    first = int(model.generate(x, 1)[0, -1])
    out = model.generate(x, 10, eos_id=first)
    assert out.shape == (1, 5)


def test_generate_stream_yields_the_same_tokens_as_generate(model):
    x = torch.randint(0, 64, (2, 3))
    streamed = torch.stack(list(model.generate_stream(x, 8, temperature=0.8, seed=3)), dim=1)
    assert torch.equal(torch.cat([x, streamed], 1), model.generate(x, 8, temperature=0.8, seed=3))


def test_generate_keeps_training_mode(model):
    model.train()
    model.generate(torch.zeros(1, 2, dtype=torch.long), 2)
    assert model.training


@pytest.mark.parametrize(
    ("idx", "match"),
    [
        (torch.zeros(2, 3), "int64/int32"),
        (torch.zeros(3, dtype=torch.long), "2-D"),
        (torch.zeros(1, 0, dtype=torch.long), "at least one token"),
        (torch.full((1, 3), 64), r"\[0, 64\)"),
        (torch.full((1, 3), -1), r"\[0, 64\)"),
        (torch.zeros(1, 41, dtype=torch.long), "max_seq_len"),
        ([1, 2, 3], "torch.Tensor"),
    ],
)
def test_bad_idx_raises_naming_idx(model, idx, match):
    with pytest.raises((ValueError, TypeError), match=match) as e:
        model(idx)
    assert "idx" in str(e.value) or "sequence length" in str(e.value)


def test_cache_overflow_raises(model):
    _, cache = model(torch.zeros(1, 39, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 2, dtype=torch.long), cache)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=2, top_k=0), "top_k"),
        (dict(max_new_tokens=2, top_p=1.5), "top_p"),
        (dict(max_new_tokens=2, eos_id=64), "eos_id"),
        (dict(max_new_tokens=40), "max_new_tokens"),
    ],
)
def test_bad_generation_settings_raise_naming_them(model, kw, match):
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **kw)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(embedding_dim=30, num_heads=4), "divisible"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_layers=2.5), "num_layers"),
    ],
)
def test_bad_config_raises_naming_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kw)


def test_config_yaml_round_trip_and_bad_files(tmp_path):
    TINY.to_yaml(tmp_path / "c.yaml")
    assert ModelConfig.from_yaml(tmp_path / "c.yaml") == TINY
    (tmp_path / "bad.yaml").write_text("vocab_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ModelConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        ModelConfig.from_yaml(tmp_path / "list.yaml")
    (tmp_path / "unk.yaml").write_text("vocab_size: 10\nwidth: 3\n")
    with pytest.raises(ConfigError, match="width"):
        ModelConfig.from_yaml(tmp_path / "unk.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")


def _cache(model, batch=2, length=3):
    return model(torch.zeros(batch, length, dtype=torch.long))[1]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda m: _cache(m, batch=1), ValueError, r"kv_cache\[0\] k must be \(batch=2"),
        (
            lambda m: tuple((k[..., :7], v[..., :7]) for k, v in _cache(m)),
            ValueError,
            r"kv_cache\[0\] k must be .*head_dim=8",
        ),
        (lambda m: _cache(m)[:1], ValueError, "one \\(k, v\\) per layer"),
        (lambda m: 5, TypeError, "kv_cache must be None or the cache"),
        (lambda m: "ab", TypeError, r"kv_cache\[0\] must be a \(k, v\) pair"),
        (lambda m: {"a": 1, "b": 2}, TypeError, "kv_cache must be None or the cache"),
        (
            lambda m: (_cache(m, length=3)[0], _cache(m, length=4)[1]),
            ValueError,
            r"kv_cache\[1\] k holds 4 positions",
        ),
        (
            lambda m: tuple((k.long(), v) for k, v in _cache(m)),
            ValueError,
            "floating point",
        ),
    ],
    ids=["batch", "head_dim", "layers", "int", "str", "dict", "lengths", "dtype"],
)
def test_bad_kv_cache_raises_naming_kv_cache(model, make, error, match):
    cache = make(model)
    with pytest.raises(error, match=match):
        model(torch.zeros(2, 1, dtype=torch.long), cache)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(eos_id=True), TypeError, "eos_id"),
        (dict(eos_id=2**70), ValueError, "eos_id"),
        (dict(eos_id=-1), ValueError, "eos_id"),
        (dict(eos_id=3.0), TypeError, "eos_id"),
        (dict(seed="abc", temperature=1.0), TypeError, "seed"),
        (dict(seed=2**70, temperature=1.0), ValueError, "seed"),
        (dict(seed=-1, temperature=1.0), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature=1e-320), ValueError, "temperature"),
        (dict(temperature="x"), TypeError, "temperature"),
        (dict(top_k=True, temperature=1.0), TypeError, "top_k"),
        (dict(top_p=float("nan"), temperature=1.0), ValueError, "top_p"),
        (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
    ],
)
def test_bad_generation_argument_types_and_values_name_the_argument(model, kw, error, match):
    kw = {"max_new_tokens": 2, **kw}
    x = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(error, match=match):
        model.generate(x, **kw)
    with pytest.raises(error, match=match):
        next(model.generate_stream(x, **kw))


def test_numpy_ints_are_accepted_as_seed_and_eos_id(model):
    np = pytest.importorskip("numpy")
    x = torch.zeros(1, 2, dtype=torch.long)
    a = model.generate(x, 3, temperature=1.0, seed=np.int64(7), eos_id=np.int32(5))
    b = model.generate(x, 3, temperature=1.0, seed=7, eos_id=5)
    assert torch.equal(a, b)


def test_the_smallest_allowed_temperature_samples_the_greedy_token():
    from ryzen_opt.models.model import sample_next

    # 20 / 1.2e-38 overflows float32: without subtracting the row maximum first the scaled
    # logits were inf and the probabilities NaN.
    logits = torch.tensor([[10.0, 20.0, 5.0], [-3.0, -4.0, 7.5]])
    gen = torch.Generator().manual_seed(0)
    out = sample_next(logits, 1.2e-38, None, None, gen)
    assert out.tolist() == [1, 2]


def test_generation_checks_arguments_once_not_per_token(model, monkeypatch):
    calls = {"idx": 0, "cache": 0}
    check_idx, check_cache = model._check_idx, model._check_cache

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(model, "_check_idx", count("idx", check_idx))
    monkeypatch.setattr(model, "_check_cache", count("cache", check_cache))
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 12, temperature=1.0, seed=0)
    assert out.shape == (2, 15)
    assert calls == {"idx": 1, "cache": 0}


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(layer_norm_eps=float("nan")), "layer_norm_eps must be finite"),
        (dict(layer_norm_eps=float("inf")), "layer_norm_eps must be finite"),
        (dict(layer_norm_eps=True), "layer_norm_eps must be a number"),
        (dict(layer_norm_eps="1e-5"), "layer_norm_eps must be a number"),
        (dict(layer_norm_eps=-1e-5), "layer_norm_eps must be > 0"),
        (dict(dropout=float("nan")), "dropout must be finite"),
        (dict(dropout=True), "dropout must be a number"),
        (dict(tie_weights="yes"), "tie_weights must be a bool"),
        (dict(vocab_size=True), "vocab_size must be a positive int"),
        (dict(max_seq_len=128.0), "max_seq_len must be a positive int"),
    ],
)
def test_every_config_field_is_validated(kw, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kw)


def test_error_messages_quote_at_most_a_bounded_repr():
    # 9**9 leaves: the full repr would be ~3 GB; quoting it must neither take time nor space.
    value = ["lol"] * 9
    for _ in range(8):
        value = [value] * 9
    with pytest.raises(ConfigError) as e:
        ModelConfig(vocab_size=value)
    assert "vocab_size" in str(e.value) and len(str(e.value)) < 300


BOMB = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
vocab_size: [*g,*g,*g,*g,*g,*g,*g,*g,*g]
"""


def test_yaml_alias_bomb_is_refused_with_a_short_message(tmp_path):
    (tmp_path / "bomb.yaml").write_text(BOMB)
    with pytest.raises(ConfigError, match="alias") as e:
        ModelConfig.from_yaml(tmp_path / "bomb.yaml")
    assert len(str(e.value)) < 400


def test_oversized_config_file_is_refused(tmp_path):
    (tmp_path / "big.yaml").write_text("# pad\n" * 200_000 + "vocab_size: 10\n")
    with pytest.raises(ConfigError, match="bytes"):
        ModelConfig.from_yaml(tmp_path / "big.yaml")
