#!/usr/bin/env bash
# One GPU call: the square and skinny sweeps of bench/gpu/tile_probe.py, or with the argument
# `fused` the fused-epilogue sweep; logs and JSON under $OUT.
set -u
mkdir -p "$OUT"; export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/device.txt" 2>&1
if [ "${1:-}" = fused ]; then
  TILE_PROBE_BUDGET_S=200 timeout 330 python bench/gpu/tile_probe.py fused > "$OUT/tile_probe-fused.log" 2>&1
  echo "fused rc $?"; cut -c1-200 "$OUT/tile_probe-fused.log"
  exit 0
fi
TILE_PROBE_BUDGET_S=110 timeout 170 python bench/gpu/tile_probe.py square > "$OUT/tile_probe-square.log" 2>&1
echo "square rc $?"; grep -v "^tma.*failed" "$OUT/tile_probe-square.log" | head -30 | cut -c1-160
TILE_PROBE_BUDGET_S=260 timeout 400 python bench/gpu/tile_probe.py skinny > "$OUT/tile_probe-skinny.log" 2>&1
echo "skinny rc $?"; cut -c1-160 "$OUT/tile_probe-skinny.log"
