#!/usr/bin/env bash
# One GPU call: the skinny, split-K and eager-plan matmul tests and the launcher tests (first failure with its traceback), then the
# matmul benchmark; everything lands under $OUT.
# Usage (device tool, repository root): bash bench/gpu/matmul_skinny.sh
set -u
mkdir -p "$OUT"; export PYTHONPATH=.
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null
timeout 320 python -m pytest -x -q -p no:randomly --tb=short --durations=8 -m "gpu or not gpu" \
  -k "skinny or split_k or plan or launcher" \
  tests/kernels/test_triton_matmul.py tests/kernels/test_triton_launcher.py \
  > "$OUT/pytest_matmul_skinny.log" 2>&1
echo "pytest rc $?"; tail -25 "$OUT/pytest_matmul_skinny.log" | cut -c1-300
timeout 240 python -m bench.triton_kernels --only matmul --out "$OUT/triton_kernels-matmul-skinny.json" > "$OUT/triton_kernels-matmul-skinny.log" 2>&1
echo "bench rc $?"; grep -E "^matmul" "$OUT/triton_kernels-matmul-skinny.log" | cut -c1-230
