#!/usr/bin/env bash
# One GPU call: both tile sweeps of bench/gpu/tile_probe.py; logs and JSON under $OUT.
set -u
mkdir -p "$OUT"; export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/device.txt" 2>&1
TILE_PROBE_BUDGET_S=110 timeout 170 python bench/gpu/tile_probe.py square > "$OUT/tile_probe-square.log" 2>&1
echo "square rc $?"; grep -v "^tma.*failed" "$OUT/tile_probe-square.log" | head -30 | cut -c1-160
TILE_PROBE_BUDGET_S=260 timeout 400 python bench/gpu/tile_probe.py skinny > "$OUT/tile_probe-skinny.log" 2>&1
echo "skinny rc $?"; cat "$OUT/tile_probe-skinny.log" | cut -c1-160
