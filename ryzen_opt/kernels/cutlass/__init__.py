"""CUTLASS kernels for Hopper GPUs (sm_90): matmul with fused epilogues.

Triton 3.6 does not generate the warp-specialized ping-pong schedule on sm_90 (two consumer
warp groups taking turns, one's epilogue running while the other's MMAs do), which is what
lets a fused bias + activation epilogue cost nothing. CUTLASS's collective builders do: this
backend instantiates them (``csrc/linear_sm90.cuh``), builds each kernel once per machine
with ``nvcc`` (see :mod:`ryzen_opt.kernels.cutlass._build`) and calls it through ctypes.

Needs an sm_90 GPU, ``nvcc`` and CUTLASS's headers (``pip install "ryzen-opt[cutlass]"``);
without them the backend reports itself unavailable and the registry never picks it.
Prebuild every kernel with ``python -m ryzen_opt.kernels.cutlass``.
"""
