#!/usr/bin/env bash
# One GPU call: every case of `bench.triton_kernels` (matmul, attention, decode, layer_norm;
# the CUTLASS kernels these cases run are built inside the run, from the nvidia-cutlass wheel
# carried in .whl/) twice, for the run-to-run spread, then `bench.train_kernels` on the
# training attention (the backward's case); logs and JSON under $OUT.
# Usage (device tool, repository root, carry [".whl"]): bash bench/gpu/closeout.sh [suffix]
set -u
SUF="${1:-closeout}"
export PYTHONUNBUFFERED=1
source bench/gpu/cutlass_env.sh
cat "$OUT/device.txt"
for run in 1 2; do
  timeout $((400 - SECONDS)) python -m bench.triton_kernels --out "$OUT/triton_kernels-$SUF-run$run.json" \
    > "$OUT/triton_kernels-$SUF-run$run.log" 2>&1
  echo "bench run $run rc $? at ${SECONDS}s"
  grep -E "^(matmul|attention|decode|layer_norm)" "$OUT/triton_kernels-$SUF-run$run.log" \
    | grep -v skinny | cut -c1-200
done
timeout $((585 - SECONDS)) python -m bench.train_kernels --device cuda --only attention_causal \
  --out "$OUT" > "$OUT/train_kernels-$SUF.log" 2>&1
echo "train_kernels rc $? at ${SECONDS}s"; grep -E "^\| attention" "$OUT/train_kernels.md"
for f in json md; do [ -f "$OUT/train_kernels.$f" ] && mv "$OUT/train_kernels.$f" "$OUT/train_kernels-$SUF.$f"; done
