#!/usr/bin/env bash
# One GPU call: install the carried wheels, run the GPU tests of the HF decoder paths and the
# HF decode benchmark; everything lands under $OUT. Usage (device tool, repository root):
#   bash bench/gpu/session.sh "<pytest selection>" "<hf_decode models>" "<extra hf_decode args>"
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site:.
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
TESTS=${1:-}
MODELS=${2:-}
EXTRA=${3:-}
if [ -n "$TESTS" ]; then
  timeout 300 python -m pytest -q -p no:randomly -x $TESTS 2>&1 | tail -40 | tee "$OUT/pytest.log"
fi
for m in $MODELS; do
  timeout 420 python -m bench.hf_decode --device cuda --model "$m" $EXTRA -o "$OUT/hf_decode-$m.json" 2>&1 | tail -30 | tee "$OUT/hf_decode-$m.log"
  cp "$OUT/hf_decode-$m.md" /dev/null 2>/dev/null || true
done
