#!/usr/bin/env bash
# One device call: GPU tests, then the kernel and model benchmarks on CUDA. Results go to
# $OUT (the device tool's output folder) or ./gpu_out. Needs pyperf (carried as a wheel in
# .whl/ when the machine has none).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ! python3 -c "import pyperf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/run.log"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu --continue-on-collection-errors tests 2>&1 | tail -40 > "$OUT/pytest_gpu.log"
tail -3 "$OUT/pytest_gpu.log"
timeout ${KERNEL_TIMEOUT:-200} python3 -m bench.kernels --device cuda --quick \
  -o "$OUT/kernels.json" 2>&1 | tail -80 >> "$OUT/run.log"
timeout ${MODEL_TIMEOUT:-150} python3 -m bench.model --device cuda --quick \
  -o "$OUT/model.json" 2>&1 | tail -30 >> "$OUT/run.log"
tail -15 "$OUT/run.log"
