"""bench/gpu/cutlass_probe.py: its variant files and its build, against a stand-in nvcc (the
kernels themselves run only on an sm_90 GPU, where the probe checks each against fp32)."""

import importlib.util
import re
import stat
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
_PATH = _ROOT / "bench" / "gpu" / "cutlass_probe.py"


@pytest.fixture
def probe(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("cutlass_probe", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = tmp_path / "nvcc.log"
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'while [ $# -gt 1 ]; do shift; done\n'
        'printf o > "$1"\n'
    )  # fmt: skip
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("NVCC", str(nvcc))
    monkeypatch.setattr(mod, "BUILD", str(tmp_path / "build"))
    return mod, calls


def test_each_variant_file_exports_its_own_name():
    files = sorted((_ROOT / "bench" / "gpu" / "cutlass").glob("*.cu"))
    assert len(files) >= 5
    for f in files:
        names = re.findall(r"RZO_PROBE_VARIANT\((\w+),", f.read_text())
        assert names == [f.stem], f"{f.name} exports {names}"  # ctypes looks up <stem>_run


def test_build_compiles_every_variant_for_sm90a_then_links_them(probe):
    mod, calls = probe
    lib, names = mod.build(["/cutlass/include", "/cutlass/tools/util/include"])
    stems = sorted(f.stem for f in (_ROOT / "bench" / "gpu" / "cutlass").glob("*.cu"))
    assert names == stems and Path(lib).name == "libcutlass_probe.so"
    lines = calls.read_text().splitlines()
    compiles, link = lines[:-1], lines[-1]
    assert len(compiles) == len(stems)
    for line in compiles:
        assert " -c " in line and "-gencode=arch=compute_90a,code=sm_90a" in line
        assert "-I/cutlass/include" in line and "ryzen_opt/kernels/cutlass/csrc" in line
        assert "-shared" not in line
    assert link.startswith("-shared") and link.count(".o") == len(stems)


def test_build_takes_only_the_named_variants(probe, monkeypatch):
    mod, calls = probe
    monkeypatch.setattr(mod, "ONLY_VARIANTS", ["pp128x128c21"])
    _, names = mod.build([])
    assert names == ["pp128x128c21"]
    assert len(calls.read_text().splitlines()) == 2  # one compile, one link
