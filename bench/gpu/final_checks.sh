#!/usr/bin/env bash
# One GPU call: the CUTLASS attention kernels built through the CLI and their GPU tests (the
# plan path included), the training attention's GPU tests and `bench.train_kernels` on its
# attention case; logs and JSON under $OUT. Needs the nvidia-cutlass wheel in .whl/ (carried).
# Usage (device tool, repository root): bash bench/gpu/final_checks.sh [suffix]
set -u
SUF="${1:-final}"
source bench/gpu/cutlass_env.sh
cat "$OUT/device.txt"
timeout 200 python -m ryzen_opt.kernels.cutlass --only attention > "$OUT/cutlass_build-$SUF.log" 2>&1
echo "build rc $? at ${SECONDS}s"; tail -1 "$OUT/cutlass_build-$SUF.log"
timeout 120 python -m pytest -q -p no:randomly --tb=short -m "gpu or not gpu" \
  tests/kernels/test_cutlass_attention.py > "$OUT/pytest_cutlass_attention-$SUF.log" 2>&1
echo "cutlass tests rc $? at ${SECONDS}s"; tail -4 "$OUT/pytest_cutlass_attention-$SUF.log" | cut -c1-300
timeout 90 python -m bench.train_kernels --device cuda --only attention_causal --out "$OUT" \
  > "$OUT/train_kernels-$SUF.log" 2>&1
echo "train_kernels rc $? at ${SECONDS}s"; grep -E "^\| attention" "$OUT/train_kernels.md"
for f in json md; do [ -f "$OUT/train_kernels.$f" ] && mv "$OUT/train_kernels.$f" "$OUT/train_kernels-$SUF.$f"; done
left=$((590 - SECONDS))
timeout "$left" python -m pytest -q -p no:randomly --tb=short -m "gpu or not gpu" \
  tests/kernels/test_triton_train_attention.py > "$OUT/pytest_train_attention-$SUF.log" 2>&1
echo "train tests rc $? at ${SECONDS}s"; tail -2 "$OUT/pytest_train_attention-$SUF.log" | cut -c1-300
