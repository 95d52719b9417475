"""The edge install: the ONNX generator without torch, and lazy public names in the full package.

``edge/pyproject.toml`` builds ``ryzen-opt-edge``, a wheel of three files of this package
(``ryzen_opt/__init__.py``, ``ryzen_opt/compress/__init__.py`` and ``runtime.py``) that depends
on numpy and onnxruntime only. The test below builds that wheel, installs it into a fresh
virtual environment (no torch), runs greedy generation there on a decoder exported by the full
package, and compares the tokens with the torch model's ``generate``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import ryzen_opt
import ryzen_opt.compress

ROOT = Path(__file__).resolve().parents[2]
# What the full package needs and the edge install must not bring or import.
HEAVY = (
    "torch",
    "numba",
    "llvmlite",
    "triton",
    "onnx",
    "onnxscript",
    "safetensors",
    "yaml",
    "rich",
    "matplotlib",
    "pyperf",
    "transformers",
)
PROMPT = [[3, 7, 1, 12, 5], [9, 0, 4, 4, 30]]
NEW_TOKENS = 24

# Runs inside the edge environment with ``python -I`` (no cwd, no user site, no PYTHON* env):
# generates greedily and reports what got imported and what is installed.
EDGE_SCRIPT = r"""
import importlib.util, json, sys
import numpy as np
from ryzen_opt.compress import OnnxGenerator
import ryzen_opt
path, prompt, n, heavy = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
ids = OnnxGenerator(path).generate(np.array(prompt, dtype=np.int64), max_new_tokens=n)
try:
    ryzen_opt.optimize
    full_name_error = None
except ModuleNotFoundError as e:
    full_name_error = str(e)
print(json.dumps({
    "tokens": ids.tolist(),
    "imported_heavy": sorted(m for m in sys.modules if m.split(".")[0] in heavy),
    "findable_heavy": sorted(m for m in heavy if importlib.util.find_spec(m) is not None),
    "ryzen_opt_file": ryzen_opt.__file__,
    "full_name_error": full_name_error,
}))
"""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    shown = " ".join(c if len(c) < 80 else c[:77] + "..." for c in cmd)
    assert out.returncode == 0, f"{shown} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


def _requirement_closure(names: list[str]) -> set[str]:
    """Distribution names these need, transitively, per the main environment's metadata."""
    seen: set[str] = set()
    todo = [n.lower().replace("_", "-") for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name.lower().replace("_", "-"))
    return seen


@pytest.fixture(scope="module")
def edge_wheel(tmp_path_factory) -> Path:
    """The ryzen-opt-edge wheel, built from a copy of ``edge/`` and ``ryzen_opt/``.

    The copy keeps setuptools' ``build/`` and ``.egg-info`` out of the checkout.
    """
    src = tmp_path_factory.mktemp("edge-src")
    ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    shutil.copytree(ROOT / "edge", src / "edge", ignore=ignore)
    shutil.copytree(ROOT / "ryzen_opt", src / "ryzen_opt", ignore=ignore)
    dist = src / "dist"
    # setuptools comes from the dev extras: no build isolation, so no download.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src / "edge"),
        ]
    )
    (wheel,) = dist.glob("ryzen_opt_edge-*.whl")
    return wheel


@pytest.fixture(scope="module")
def edge_python(edge_wheel, tmp_path_factory) -> Path:
    """The interpreter of a fresh virtual environment holding only the edge install."""
    env_dir = tmp_path_factory.mktemp("edge-venv")
    # --without-pip: no ensurepip (absent on some distributions' pythons, and ~5 s); the
    # main environment's pip installs into it with --python.
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # The versions of numpy, onnxruntime and their requirements installed here: pip's cache
    # of the main install's downloads serves them, so CI fetches nothing new.
    pins = env_dir / "pins.txt"
    pins.write_text(
        "".join(
            f"{d}=={metadata.version(d)}\n"
            for d in sorted(_requirement_closure(["numpy", "onnxruntime"]))
        )
    )
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--disable-pip-version-check",
            "-c",
            str(pins),
            str(edge_wheel),
        ]
    )
    return python


def test_edge_wheel_ships_only_the_torch_free_runtime(edge_wheel):
    with zipfile.ZipFile(edge_wheel) as z:
        modules = sorted(n for n in z.namelist() if not n.split("/")[0].endswith(".dist-info"))
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
    assert modules == [
        "ryzen_opt/__init__.py",
        "ryzen_opt/compress/__init__.py",
        "ryzen_opt/compress/runtime.py",
    ]
    requires = sorted(
        Requirement(line.split(":", 1)[1]).name
        for line in meta.decode().splitlines()
        if line.startswith("Requires-Dist:")
    )
    assert requires == ["numpy", "onnxruntime"]
    # Same bytes as the package sources: built from them, not from a copy that could drift.
    with zipfile.ZipFile(edge_wheel) as z:
        for name in modules:
            assert z.read(name) == (ROOT / name).read_bytes(), name


def test_edge_install_generates_the_torch_models_tokens_without_torch(
    edge_python, model, fp32_onnx, tmp_path
):
    listed = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(edge_python),
            "list",
            "--format=json",
            "--disable-pip-version-check",
        ]
    )
    installed = {d["name"].lower().replace("_", "-") for d in json.loads(listed.stdout)}
    allowed = {"ryzen-opt-edge", "pip", "setuptools", "wheel"} | _requirement_closure(
        ["numpy", "onnxruntime"]
    )
    assert installed <= allowed, f"the edge install brought {sorted(installed - allowed)}"
    assert {"ryzen-opt-edge", "numpy", "onnxruntime"} <= installed

    out = _run(
        [
            str(edge_python),
            "-I",
            "-c",
            EDGE_SCRIPT,
            str(fp32_onnx),
            json.dumps(PROMPT),
            str(NEW_TOKENS),
            *HEAVY,
        ],
        cwd=tmp_path,
    )
    got = json.loads(out.stdout)
    assert Path(got["ryzen_opt_file"]).is_relative_to(edge_python.parent.parent), (
        f"imported {got['ryzen_opt_file']}, not the edge install"
    )
    assert got["imported_heavy"] == [], f"the edge runtime imported {got['imported_heavy']}"
    assert got["findable_heavy"] == [], f"visible in the edge environment: {got['findable_heavy']}"
    assert got["full_name_error"] is not None and "pip install ryzen-opt" in got["full_name_error"]

    with torch.no_grad():
        want = model.generate(torch.tensor(PROMPT), NEW_TOKENS)
    assert got["tokens"] == want.tolist()


def test_importing_the_onnx_generator_loads_neither_torch_nor_the_rest():
    code = (
        "import json, sys; from ryzen_opt.compress import OnnxGenerator; "
        "import ryzen_opt; print(json.dumps(sorted(sys.modules)))"
    )
    out = _run([sys.executable, "-c", code], cwd=ROOT)
    loaded = json.loads(out.stdout)
    assert [m for m in loaded if m.split(".")[0] in HEAVY] == []
    assert [m for m in loaded if m.startswith("ryzen_opt")] == [
        "ryzen_opt",
        "ryzen_opt.compress",
        "ryzen_opt.compress.runtime",
    ]


@pytest.mark.parametrize("package", [ryzen_opt, ryzen_opt.compress], ids=lambda p: p.__name__)
def test_lazy_public_names_are_the_defining_modules_objects(package):
    assert sorted(package.__all__) == sorted(package._LAZY)
    for name in package.__all__:
        value = getattr(package, name)
        assert value is getattr(importlib.import_module(package._LAZY[name]), name), name
        assert name in dir(package)
    namespace: dict = {}
    exec(f"from {package.__name__} import *", namespace)
    assert set(package.__all__) <= set(namespace)


def test_lazy_package_resolves_submodules_and_rejects_unknown_names():
    assert ryzen_opt.kernels is importlib.import_module("ryzen_opt.kernels")
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        ryzen_opt.not_a_name  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        ryzen_opt.compress.not_a_name  # noqa: B018


def test_public_name_shared_with_a_submodule_stays_the_function_after_that_import():
    # quantize() lives in quantize.py: importing the submodule first binds the module on the
    # package; the public name must still be the function (as the eager imports made it).
    code = (
        "import types, ryzen_opt.compress.quantize, ryzen_opt.compress as c; "
        "from ryzen_opt.compress import quantize; "
        "print(isinstance(c.quantize, types.FunctionType), quantize is c.quantize)"
    )
    assert _run([sys.executable, "-c", code], cwd=ROOT).stdout.split() == ["True", "True"]
