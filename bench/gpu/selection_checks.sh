#!/usr/bin/env bash
# One GPU call: the GPU tests of the decode-loop selection, the capture and the timing helpers
# (tests/optimizer/test_hf_generate.py, test_hf.py, test_cost.py, test_fastpath.py,
# tests/test_timing.py), then `bench.hf_decode` on llama-1b at batches 1 and 16 with empty
# Triton and decision caches (a fresh machine, the default time budget); logs and JSON under
# $OUT. Usage (device tool, repository root): bash bench/gpu/selection_checks.sh [suffix]
set -u
SUF="${1:-run}"
mkdir -p "$OUT"; export PYTHONPATH=.
export TRITON_CACHE_DIR=/tmp/triton-cache-$SUF RYZEN_OPT_CACHE_DIR=/tmp/ryzen-cache-$SUF
rm -rf "$TRITON_CACHE_DIR" "$RYZEN_OPT_CACHE_DIR"
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
timeout 250 python -m pytest -q -p no:randomly --tb=short tests/optimizer/test_hf_generate.py \
  tests/optimizer/test_hf.py tests/optimizer/test_cost.py tests/optimizer/test_fastpath.py \
  tests/test_timing.py > "$OUT/pytest_selection-$SUF.log" 2>&1
echo "pytest rc $? at ${SECONDS}s"; tail -8 "$OUT/pytest_selection-$SUF.log" | cut -c1-300
left=$((585 - SECONDS))
timeout "$left" python -m bench.hf_decode --device cuda --model llama-1b --variants eager,optimize \
  --batches 1,16 -o "$OUT/hf_decode-llama-1b-$SUF.json" > "$OUT/hf_decode-llama-1b-$SUF.log" 2>&1
echo "hf_decode rc $? at ${SECONDS}s"
grep -E "decode b|built in|^\| (eager|optimize)|^│ (eager|optimize)" "$OUT/hf_decode-llama-1b-$SUF.log" | cut -c1-300
