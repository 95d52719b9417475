#!/usr/bin/env bash
# One GPU call: the CUTLASS attention kernels built and probed (bench/gpu/attention_cutlass_probe.py:
# every schedule checked on odd shapes, then timed beside cuDNN SDPA and the Triton kernel), the
# backend's GPU tests, and with "bench" the attention benchmark; logs and JSON under $OUT.
# Needs the nvidia-cutlass wheel in .whl/ (carried: `pip download nvidia-cutlass --no-deps
# -d .whl` here, then the device tool's carry [".whl"]).
# ATTN_PROBE=0 skips the probe; the tests then include the CUTLASS matmul's.
# Usage (repository root): bash bench/gpu/attention_cutlass.sh [suffix] [bench]
set -u
SUF="${1:-probe}"
source bench/gpu/cutlass_env.sh
TESTS=tests/kernels/test_cutlass_attention.py
if [ "${ATTN_PROBE:-1}" = 1 ]; then
  timeout 330 python bench/gpu/attention_cutlass_probe.py > "$OUT/attention_cutlass_probe-$SUF.log" 2>&1
  echo "probe rc $?"; cut -c1-400 "$OUT/attention_cutlass_probe-$SUF.log" | grep -v "^check.* ok$"
  [ -f "$OUT/attention_cutlass_probe.json" ] && mv "$OUT/attention_cutlass_probe.json" "$OUT/attention_cutlass_probe-$SUF.json"
else  # every kernel through the CLI first, then the matmul's tests too
  timeout 300 python -m ryzen_opt.kernels.cutlass > "$OUT/cutlass_build-$SUF.log" 2>&1
  echo "build rc $?"; tail -1 "$OUT/cutlass_build-$SUF.log"
  TESTS="$TESTS tests/kernels/test_cutlass_matmul.py"
fi
timeout 300 python -m pytest -q -p no:randomly --tb=short -m "gpu or not gpu" \
  $TESTS > "$OUT/pytest_cutlass_attention-$SUF.log" 2>&1
echo "pytest rc $?"; tail -15 "$OUT/pytest_cutlass_attention-$SUF.log" | cut -c1-300
if [ "${2:-}" = bench ]; then
  timeout 240 python -m bench.triton_kernels --only attention \
    --out "$OUT/triton_kernels-attention-$SUF.json" > "$OUT/triton_kernels-attention-$SUF.log" 2>&1
  echo "bench rc $?"; grep -E "^attention" "$OUT/triton_kernels-attention-$SUF.log" | cut -c1-260
  if [ "${ATTN_BENCH_TWICE:-0}" = 1 ]; then
    timeout 240 python -m bench.triton_kernels --only attention \
      --out "$OUT/triton_kernels-attention-$SUF-run2.json" > "$OUT/triton_kernels-attention-$SUF-run2.log" 2>&1
    echo "bench run2 rc $?"; grep -E "^attention" "$OUT/triton_kernels-attention-$SUF-run2.log" | cut -c1-260
  fi
fi
