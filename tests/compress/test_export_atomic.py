"""export_onnx writes under a temporary name and renames: a failed or killed export never
leaves a partial file at the destination, nor destroys the file it was replacing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from ryzen_opt.compress import OnnxGenerator, export_onnx
from ryzen_opt.compress import export as export_mod
from ryzen_opt.compress.export import check_output_path

ROOT = Path(__file__).resolve().parents[2]

# The child exports the tiny model, but its final save writes half the bytes and then the
# process SIGKILLs itself: no Python cleanup runs, as with an OOM kill or `kill -9`.
_KILLED_CHILD = """
import os, signal, sys
import onnx
from tests.compress.conftest import tiny_model
from ryzen_opt.compress import export_onnx

def killing_save(proto, f, *args, **kwargs):
    data = proto.SerializeToString()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

onnx.save = killing_save
export_onnx(tiny_model(), sys.argv[1])
"""


def _hidden_temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("."))


def test_killed_export_keeps_the_old_file_and_the_next_export_cleans_up(fp32_onnx, tmp_path):
    dst = tmp_path / "model.onnx"
    shutil.copy(fp32_onnx, dst)
    good = dst.read_bytes()
    res = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(dst)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert dst.read_bytes() == good  # the good file survived, byte for byte
    OnnxGenerator(dst)  # and still loads
    left = _hidden_temporaries(tmp_path)
    assert len(left) == 1 and left[0].name.startswith(".model.onnx.")  # the dead writer's
    # The next export to the same path removes the dead writer's temporary, and leaves a
    # live writer's (our parent process's pid) alone.
    live = tmp_path / f".model.onnx.{os.getppid()}.abcd1234.tmp"
    live.write_bytes(b"in progress")
    export_onnx(_tiny(), dst)
    assert _hidden_temporaries(tmp_path) == [live]
    onnx.checker.check_model(str(dst), full_check=True)
    ids = np.array([[3, 4]])
    np.testing.assert_array_equal(
        OnnxGenerator(dst).generate(ids, 3), OnnxGenerator(fp32_onnx).generate(ids, 3)
    )


def test_killed_first_export_leaves_no_file_at_the_destination(tmp_path):
    dst = tmp_path / "fresh.onnx"
    res = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(dst)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert not dst.exists()


def _tiny():
    from tests.compress.conftest import tiny_model

    return tiny_model()


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_removes_temporaries_and_keeps_the_old_file(
    fp32_onnx, tmp_path, monkeypatch, existing
):
    dst = tmp_path / "m.onnx"
    if existing:
        shutil.copy(fp32_onnx, dst)
    before = dst.read_bytes() if existing else None

    def failing_save(proto, f, *args, **kwargs):
        Path(f).write_bytes(proto.SerializeToString()[:100])
        Path(str(f) + ".data").write_bytes(b"external weights")  # a side file, if any
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod.onnx, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        export_onnx(_tiny(), dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m.onnx"] if existing else [])
    if existing:
        assert dst.read_bytes() == before


def test_interrupt_mid_write_removes_the_temporary(tmp_path, monkeypatch):
    def interrupted_save(proto, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod.onnx, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(_tiny(), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad,msg", [("", "empty path"), (".", "is a folder")])
def test_output_path_must_name_a_file(bad, msg):
    with pytest.raises(ValueError, match=f"path.*{msg}"):
        check_output_path(bad)


def test_output_path_rules(tmp_path):
    f = tmp_path / "f.onnx"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="already exists"):
        check_output_path(f, force=False)
    assert check_output_path(f, force=True) == f
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_path(f / "x.onnx")
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(_tiny(), tmp_path)
