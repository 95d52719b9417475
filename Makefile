# Set-up is part of every target: a fresh machine needs only Python 3.10+, pip, gcc and make.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU-capable torch pin installed before the package resolves, so a CPU-only machine never
# downloads a CUDA build. Override on a GPU machine: make test TORCH_SPEC='torch==2.13.0'.
TORCH_SPEC ?= torch==2.13.0
QUICK ?= --quick

.PHONY: install test bench lint format checkpoint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: install
	$(PY) -m ruff check ryzen_opt bench tests
	$(PY) -m pytest -q

# The quick suite: the kernel table, then bench.model's baseline | optimize() | torch.compile |
# ONNX Runtime table; with --quick each runs every column in one process (5 values per cell).
bench: install
	$(PY) -m bench.kernels $(QUICK)
	$(PY) -m bench.model $(QUICK)

lint: install
	$(PY) -m ruff check ryzen_opt bench tests
	$(PY) -m ruff format --check ryzen_opt bench tests

format: install
	$(PY) -m ruff format ryzen_opt bench tests
	$(PY) -m ruff check --fix ryzen_opt bench tests

# The trained default checkpoint later issues use (about 10 minutes on 2 cores).
checkpoint: install
	$(PY) -m ryzen_opt.models.train --config configs/train_default.yaml --out runs/default

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
