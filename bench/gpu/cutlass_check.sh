#!/usr/bin/env bash
# One GPU call: build the CUTLASS backend's kernels (python -m ryzen_opt.kernels.cutlass, all
# in parallel), run its tests on the GPU, then the matmul benchmark with the cutlass rows;
# logs and JSON under $OUT. CUTLASS's headers come from the nvidia-cutlass wheel in .whl/
# (carried: `pip download nvidia-cutlass --no-deps -d .whl`, device tool carry [".whl"]).
# Usage (repository root): bash bench/gpu/cutlass_check.sh [suffix]
set -u
SUF="${1:-cutlass}"
source bench/gpu/cutlass_env.sh
timeout 200 python -m ryzen_opt.kernels.cutlass > "$OUT/cutlass_build-$SUF.log" 2>&1
echo "build rc $?"; tail -4 "$OUT/cutlass_build-$SUF.log" | cut -c1-300
timeout 150 python -m pytest -q -p no:randomly --tb=short -m "gpu or not gpu" \
  tests/kernels/test_cutlass_matmul.py > "$OUT/pytest_cutlass-$SUF.log" 2>&1
echo "pytest rc $?"; tail -15 "$OUT/pytest_cutlass-$SUF.log" | cut -c1-300
timeout 220 python -m bench.triton_kernels --only matmul \
  --out "$OUT/triton_kernels-matmul-$SUF.json" > "$OUT/triton_kernels-matmul-$SUF.log" 2>&1
echo "bench rc $?"; grep -E "^matmul|cutlass|cuBLASLt" "$OUT/triton_kernels-matmul-$SUF.log" | grep -v skinny | cut -c1-230
