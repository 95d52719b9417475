import pytest
import torch

from ryzen_opt.models import (
    CheckpointError,
    ModelConfig,
    SimpleTransformerModel,
    load_checkpoint,
    save_checkpoint,
)

TINY = ModelConfig(
    vocab_size=50, embedding_dim=16, num_heads=2, num_layers=1, ff_dim=32, max_seq_len=16
)


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, tie):
    cfg = ModelConfig(**{**TINY.to_dict(), "tie_weights": tie})
    m = SimpleTransformerModel(cfg).eval()
    save_checkpoint(m, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.config == cfg
    x = torch.randint(0, 50, (2, 7))
    assert torch.equal(m(x)[0], loaded(x)[0])
    if tie:
        assert loaded.head.weight is loaded.tok_emb.weight


def test_checkpoint_files_are_safetensors_and_yaml_only(tmp_path):
    save_checkpoint(SimpleTransformerModel(TINY), tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.yaml",
        "model.safetensors",
    ]


def test_corrupt_weights_raise_checkpoint_error(tmp_path):
    save_checkpoint(SimpleTransformerModel(TINY), tmp_path / "ck")
    w = tmp_path / "ck" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "ck")
    w.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "ck")


def test_shape_mismatch_names_the_tensor(tmp_path):
    save_checkpoint(SimpleTransformerModel(TINY), tmp_path / "ck")
    ModelConfig(**{**TINY.to_dict(), "ff_dim": 48}).to_yaml(tmp_path / "ck" / "config.yaml")
    with pytest.raises(CheckpointError, match="fc1.weight"):
        load_checkpoint(tmp_path / "ck")


def test_missing_tensors_are_named(tmp_path):
    save_checkpoint(SimpleTransformerModel(TINY), tmp_path / "ck")
    ModelConfig(**{**TINY.to_dict(), "num_layers": 2}).to_yaml(tmp_path / "ck" / "config.yaml")
    with pytest.raises(CheckpointError, match="missing.*blocks.1"):
        load_checkpoint(tmp_path / "ck")


def test_missing_folder_and_bad_config_raise(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    save_checkpoint(SimpleTransformerModel(TINY), tmp_path / "ck")
    (tmp_path / "ck" / "config.yaml").write_text("vocab_size: -3\n")
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_checkpoint(tmp_path / "ck")


def test_save_rejects_a_model_without_config(tmp_path):
    with pytest.raises(TypeError, match="ModelConfig"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x")
