#!/usr/bin/env bash
# One GPU call: the TMA-path and eager-plan GPU tests, selected by node id (first failure with
# its traceback), then the matmul benchmark; everything lands under $OUT.
# Usage (device tool, repository root): bash bench/gpu/matmul_tma.sh [bench]
set -u
mkdir -p "$OUT"; export PYTHONPATH=.
T=tests/kernels/test_triton_matmul.py
timeout 300 python -m pytest -x -q -p no:randomly --tb=short --durations=8 \
  "$T::test_matmul_gpu_tma_path_is_taken_and_matches_reference" \
  "$T::test_matmul_gpu_tma_path_in_a_new_thread_and_a_graph" \
  "$T::test_matmul_tma_kernel_matches_reference" "$T::test_matmul_tma_layout_rules" \
  tests/kernels/test_triton_launcher.py > "$OUT/pytest_matmul_tma.log" 2>&1
echo "pytest rc $?"; tail -40 "$OUT/pytest_matmul_tma.log" | cut -c1-300
if [ "${1:-}" = bench ]; then
  timeout 200 python -m bench.triton_kernels --only matmul --out "$OUT/triton_kernels-matmul-tma.json" > "$OUT/triton_kernels-matmul-tma.log" 2>&1
  echo "bench rc $?"; grep -E "^matmul" "$OUT/triton_kernels-matmul-tma.log" | cut -c1-200
fi
