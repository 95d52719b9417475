#!/usr/bin/env bash
# One GPU call: the matmul and launcher GPU tests selected by a -k expression (first failure
# with its traceback), then the matmul benchmark; everything lands under $OUT.
# Usage (device tool, repository root):
#   bash bench/gpu/matmul_skinny.sh [suffix] [-k expression]
# (defaults: suffix "skinny", expression "skinny or split_k or plan or launcher")
set -u
mkdir -p "$OUT"; export PYTHONPATH=.
SUF="${1:-skinny}"; SEL="${2:-skinny or split_k or plan or launcher}"
timeout 360 python -m pytest -x -q -p no:randomly --tb=short --durations=8 -m "gpu or not gpu" \
  -k "$SEL" tests/kernels/test_triton_matmul.py tests/kernels/test_triton_launcher.py \
  > "$OUT/pytest_matmul_$SUF.log" 2>&1
echo "pytest rc $?"; tail -25 "$OUT/pytest_matmul_$SUF.log" | cut -c1-300
timeout 200 python -m bench.triton_kernels --only matmul --out "$OUT/triton_kernels-matmul-$SUF.json" > "$OUT/triton_kernels-matmul-$SUF.log" 2>&1
echo "bench rc $?"; grep -E "^matmul" "$OUT/triton_kernels-matmul-$SUF.log" | cut -c1-230
