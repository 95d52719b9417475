"""CUTLASS kernels for Hopper GPUs (sm_90): matmul with fused epilogues, attention forward.

Triton 3.6 does not generate the warp-specialized ping-pong schedule on sm_90 (two consumer
warp groups taking turns, one's epilogue running while the other's MMAs do), which is what
lets a fused bias + activation epilogue cost nothing, nor FlashAttention-3's producer /
consumer warp groups. CUTLASS's collective builders and its Hopper FMHA collectives do: this
backend instantiates them (``csrc/linear_sm90.cuh``, ``csrc/attention_sm90.cuh``), builds each
kernel once per machine with ``nvcc`` (see :mod:`ryzen_opt.kernels.cutlass._build`) and calls
it through ctypes. This departs from DESIGN.md's Triton-on-CUDA rule for these two ops, for
the schedules above.

Needs an sm_90 GPU, ``nvcc`` and CUTLASS's headers (``pip install "ryzen-opt[cutlass]"``);
without them the backend reports itself unavailable and the registry never picks it. Kernels
are built ahead of time, never inside a call (a build takes about a minute, which would land
in ``optimize()``'s time budget): ``python -m ryzen_opt.kernels.cutlass`` builds every one;
until then ``supports()`` reports the kernel a call needs as not built.
"""
