#!/usr/bin/env bash
# One GPU call: the training attention's GPU tests, the backward A/B timings
# (`python -m bench.triton_ab attention-bwd`) and, in the time left of the call's 600 s,
# `bench.hf_decode` on the models named; logs and JSON under $OUT.
# Usage (device tool, repository root): bash bench/gpu/train_attention.sh [suffix] [models]
set -u
SUF="${1:-run}"
mkdir -p "$OUT"; export PYTHONPATH=.
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
timeout 300 python -m pytest -q -p no:randomly --tb=short -m "gpu or not gpu" \
  tests/kernels/test_triton_train_attention.py tests/kernels/test_triton_train_compile.py \
  > "$OUT/pytest_train_attention-$SUF.log" 2>&1
echo "pytest rc $? at ${SECONDS}s"; tail -5 "$OUT/pytest_train_attention-$SUF.log" | cut -c1-300
timeout 300 python -m bench.triton_ab attention-bwd --out "$OUT" > "$OUT/attention_bwd-$SUF.log" 2>&1
echo "a/b rc $? at ${SECONDS}s"; cut -c1-400 "$OUT/attention_bwd-$SUF.log"
[ -f "$OUT/attention_bwd.json" ] && mv "$OUT/attention_bwd.json" "$OUT/attention_bwd-$SUF.json"
for m in ${2:-}; do
  left=$((585 - SECONDS))
  [ "$left" -lt 60 ] && { echo "hf_decode $m: not run, ${left}s left"; continue; }
  timeout "$left" python -m bench.hf_decode --device cuda --model "$m" --variants eager,optimize \
    --batches 1 -o "$OUT/hf_decode-$m-$SUF.json" > "$OUT/hf_decode-$m-$SUF.log" 2>&1
  echo "hf_decode $m rc $? at ${SECONDS}s"; grep -E "decode b|built in|^\| (eager|optimize)" "$OUT/hf_decode-$m-$SUF.log" | cut -c1-300
done
