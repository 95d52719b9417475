"""The README's Python examples run, so they never rot."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python examples"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"README python block {i} failed: {e!r}\n{block}") from e


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make bench" in text and "make test" in text


def test_public_names_import():
    import ryzen_opt

    for name in (
        "optimize",
        "KernelOptimizer",
        "SemanticCompressor",
        "InferenceScalingEngine",
        "SimpleTransformerModel",
    ):
        assert hasattr(ryzen_opt, name), name
