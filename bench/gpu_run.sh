#!/usr/bin/env bash
# GPU runs, one or more parts per device call (each call has a 10-minute limit):
#   bash bench/gpu_run.sh tests hf     GPU-marked tests of optimize()/fast paths/bench, then
#                                      the HF Llama 2k-token prefill benchmark
#   bash bench/gpu_run.sh model        python -m bench.model --device cuda --mode inprocess
#                                      (every variant in one process, CUDA events)
#   bash bench/gpu_run.sh decode_step  python -m bench.decode_step --device cuda
#   bash bench/gpu_run.sh kernels      python -m bench.kernels --device cuda --quick
#                                      --mode inprocess (one process, CUDA events)
# Results go to $OUT (the device tool's output folder) or ./gpu_out; run.log records each
# part's start, wall time and exit status. Needs pyperf (carried as a wheel in .whl/ when
# the machine has none).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ! python3 -c "import pyperf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$OUT/run.log"
python3 -c "import torch, triton, numba, transformers; print('torch', torch.__version__, \
'triton', triton.__version__, 'numba', numba.__version__, 'transformers', \
transformers.__version__)" >> "$OUT/run.log" 2>&1
for part in "$@"; do
  echo "== $part: start $(date -u +%H:%M:%S)" >> "$OUT/run.log"
  start=$(date +%s)
  case "$part" in
    tests)
      timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/optimizer tests/test_optimizer.py tests/bench 2>&1 | tail -60 > "$OUT/pytest_gpu.log"
      tail -3 "$OUT/pytest_gpu.log" ;;
    hf)
      timeout ${HF_TIMEOUT:-300} python3 -m bench.hf_prefill --device cuda \
        -o "$OUT/hf_prefill.json" 2>&1 | tail -40 >> "$OUT/run.log" ;;
    model)
      timeout ${MODEL_TIMEOUT:-540} python3 -m bench.model --device cuda --mode inprocess \
        -o "$OUT/model.json" 2>&1 | tail -40 >> "$OUT/run.log" ;;
    decode_step)
      timeout ${STEP_TIMEOUT:-120} python3 -m bench.decode_step --device cuda \
        -o "$OUT/decode_step.json" 2>&1 | tail -20 >> "$OUT/run.log" ;;
    kernels)
      timeout ${KERNEL_TIMEOUT:-300} python3 -m bench.kernels --device cuda --quick \
        --mode inprocess -o "$OUT/kernels.json" 2>&1 | tail -80 >> "$OUT/run.log" ;;
    *) echo "unknown part $part" >> "$OUT/run.log"; false ;;
  esac
  rc=$?
  echo "== $part: wall $(( $(date +%s) - start )) s, exit $rc" >> "$OUT/run.log"
done
tail -40 "$OUT/run.log"
