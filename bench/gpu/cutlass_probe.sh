#!/usr/bin/env bash
# One GPU call: the library's CUTLASS kernels built (python -m ryzen_opt.kernels.cutlass), then
# the probe (bench/gpu/cutlass/*.cu built in parallel, timed beside cuBLAS, the Triton matmul
# and the library's CUTLASS backend), then with "bench" the matmul benchmark; under $OUT.
# Needs the nvidia-cutlass wheel in .whl/ (carried: `pip download nvidia-cutlass --no-deps
# -d .whl` here, then the device tool's carry [".whl"]).
# Usage (repository root): bash bench/gpu/cutlass_probe.sh [suffix] [bench]
set -u
SUF="${1:-probe}"
source bench/gpu/cutlass_env.sh
timeout 200 python -m ryzen_opt.kernels.cutlass > "$OUT/cutlass_build-$SUF.log" 2>&1
echo "library build rc $?"; tail -1 "$OUT/cutlass_build-$SUF.log"
timeout 330 python bench/gpu/cutlass_probe.py --cutlass "$CUTLASS_DIR" > "$OUT/cutlass_probe-$SUF.log" 2>&1
echo "probe rc $?"; cut -c1-200 "$OUT/cutlass_probe-$SUF.log" | grep -v "^build"
[ -f cutlass_probe.json ] && mv cutlass_probe.json "$OUT/cutlass_probe-$SUF.json"
[ -f "$OUT/cutlass_probe.json" ] && mv "$OUT/cutlass_probe.json" "$OUT/cutlass_probe-$SUF.json"
if [ "${2:-}" = bench ]; then
  timeout 200 python -m bench.triton_kernels --only matmul \
    --out "$OUT/triton_kernels-matmul-$SUF.json" > "$OUT/triton_kernels-matmul-$SUF.log" 2>&1
  echo "bench rc $?"; grep -E "^matmul" "$OUT/triton_kernels-matmul-$SUF.log" | grep -v skinny | cut -c1-200
fi
