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


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_untied_weights_under_a_tied_config_are_rejected_naming_both(tmp_path):
    cfg = ModelConfig(**{**TINY.to_dict(), "tie_weights": False})
    save_checkpoint(SimpleTransformerModel(cfg), tmp_path / "ck")
    TINY.to_yaml(tmp_path / "ck" / "config.yaml")  # declares them tied
    with pytest.raises(CheckpointError, match="head.weight differs from tok_emb.weight"):
        load_checkpoint(tmp_path / "ck")


def test_tied_checkpoint_that_stores_equal_head_and_embedding_loads(tmp_path):
    from safetensors.torch import save_file

    m = SimpleTransformerModel(TINY).eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}  # head.weight stored twice
    (tmp_path / "ck").mkdir()
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    TINY.to_yaml(tmp_path / "ck" / "config.yaml")
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.head.weight is loaded.tok_emb.weight
    assert torch.equal(loaded.head.weight, m.head.weight)


def test_nan_layer_norm_eps_in_the_config_file_is_rejected(tmp_path):
    save_checkpoint(SimpleTransformerModel(TINY), tmp_path / "ck")
    cfg = tmp_path / "ck" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("layer_norm_eps: 1.0e-05", "layer_norm_eps: .nan"))
    with pytest.raises(CheckpointError, match="layer_norm_eps must be finite"):
        load_checkpoint(tmp_path / "ck")


def test_header_is_checked_before_any_model_is_built(tmp_path, monkeypatch):
    # A vocabulary of 10**9 used to allocate (20 s, then an allocation error) before the
    # shapes were compared. Building any model before the check fails this test.
    from ryzen_opt.models import checkpoint

    save_checkpoint(SimpleTransformerModel(TINY), tmp_path / "ck")
    ModelConfig(**{**TINY.to_dict(), "vocab_size": 10**9}).to_yaml(tmp_path / "ck" / "config.yaml")

    def never(config):
        raise AssertionError("a model was built before the header was checked")

    monkeypatch.setattr(checkpoint, "SimpleTransformerModel", never)
    with pytest.raises(CheckpointError, match=r"tok_emb.weight has shape \(50, 16\)"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("layers", [1, 3])
def test_state_shapes_equal_the_model_state_dict(tie, layers):
    from ryzen_opt.models.model import state_shapes

    cfg = ModelConfig(**{**TINY.to_dict(), "tie_weights": tie, "num_layers": layers})
    real = {n: tuple(t.shape) for n, t in SimpleTransformerModel(cfg).state_dict().items()}
    assert list(state_shapes(cfg).items()) == list(real.items())


def test_non_float_tensor_is_named_from_the_header(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in SimpleTransformerModel(TINY).state_dict().items()}
    state["ln_f.bias"] = state["ln_f.bias"].long()
    del state["head.weight"]
    (tmp_path / "ck").mkdir()
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    TINY.to_yaml(tmp_path / "ck" / "config.yaml")
    with pytest.raises(CheckpointError, match="ln_f.bias is I64"):
        load_checkpoint(tmp_path / "ck")


def test_failed_save_removes_its_temporary_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from ryzen_opt.models import checkpoint

    good = SimpleTransformerModel(TINY).eval()
    save_checkpoint(good, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    def failing(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", failing)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(SimpleTransformerModel(TINY), tmp_path / "ck")
    assert _files(tmp_path / "ck") == ["config.yaml", "model.safetensors"]
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before


_KILLED_WRITER = """
import sys, time
import torch
from ryzen_opt.models import checkpoint
from ryzen_opt.models.checkpoint import save_checkpoint
from tests.models.test_checkpoint import TINY


def slow(state, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\\0" * 65536)
        f.flush()
    print("writing", flush=True)
    time.sleep(60)


checkpoint.save_file = slow
torch.manual_seed(1)
save_checkpoint(checkpoint.SimpleTransformerModel(TINY), sys.argv[1])
"""


def test_save_killed_mid_write_keeps_the_old_checkpoint_and_next_save_cleans_up(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "ck"
    good = SimpleTransformerModel(TINY).eval()
    save_checkpoint(good, folder)
    before = (folder / "model.safetensors").read_bytes()
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(folder)],
        cwd=root,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert child.stdout.readline().strip() == b"writing"
    finally:
        child.send_signal(signal.SIGKILL)  # no finally block runs: the temporary stays
        child.wait(timeout=30)
        child.stdout.close()
    leftovers = [n for n in _files(folder) if n not in ("config.yaml", "model.safetensors")]
    assert leftovers and all(n.startswith(".model.safetensors.") for n in leftovers)
    assert (folder / "model.safetensors").read_bytes() == before
    x = torch.randint(0, 50, (2, 5))
    assert torch.equal(load_checkpoint(folder)(x)[0], good(x)[0])  # the temporary is ignored
    save_checkpoint(good, folder)  # its writer is dead: the next save removes it
    assert _files(folder) == ["config.yaml", "model.safetensors"]
