# Sourced by cutlass_check.sh and cutlass_probe.sh on the GPU machine: device and versions to
# $OUT/device.txt, CUTLASS's headers unpacked from the nvidia-cutlass wheel carried in .whl/
# (`pip download nvidia-cutlass --no-deps -d .whl` here, device tool carry [".whl"]) into
# CUTLASS_DIR, and a fresh kernel cache.
mkdir -p "$OUT"; export PYTHONPATH=.
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; nvcc --version | tail -2
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/device.txt" 2>&1
SRC=$(mktemp -d); python -m zipfile -e .whl/nvidia_cutlass-*.whl "$SRC"
export CUTLASS_DIR="$SRC/cutlass_library/source" RYZEN_OPT_CUTLASS_CACHE="$SRC/cache"
