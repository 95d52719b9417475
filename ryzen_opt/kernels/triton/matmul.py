"""Triton matmul: tiled, grouped-ordered, autotuned per shape bucket, with a fused epilogue.

``activation(a @ b + bias) + residual`` cast to ``out_dtype``, for 2-D and batched 3-D inputs
of any strides. bf16/fp16 operands accumulate in fp32; fp32 operands run through TF32 tensor
cores only when ``torch.backends.cuda.matmul.allow_tf32`` is set (otherwise ``supports``
says why not). Kernels:

* ``_matmul_kernel``: one output tile per program, or (``PERSISTENT``) one program per SM
  walking the tiles; the autotuner times both kinds of config and keeps the faster.
* ``_matmul_splitk_kernel``: skinny M (<= 64), where a plain tiling leaves most SMs idle
  (M=16, N=4096 with BLOCK_N=64 is 64 programs for 132 SMs). The K range is split across
  programs writing fp32 partials. Called eagerly, the last program of each tile to finish
  (counted on a tile counter) sums them in a fixed order and applies the epilogue, all in
  one launch; under CUDA-graph capture ``_splitk_reduce_kernel`` sums them in a second
  launch spread over many programs (see :func:`_split_k_one_pass` for the measurements).
  Once the output tiles cover half the SMs, skinny calls take no split
  (:func:`_split_k`); on sm_90+ 16-bit skinny calls use one fixed tile (:func:`_skinny_config`).
* ``_matmul_tma_kernel`` (sm_90+): large 16-bit problems, operands and output moved by TMA.

Eager calls at decode sizes are bound by host time, so both launch through
:class:`~ryzen_opt.kernels.triton._launcher.CachedLauncher`, and an eager call whose
signature (shapes, strides, dtypes, devices, alignment, options, stream) was seen before
replays that launch directly (:class:`_EagerPlan`): no argument checks, no kernel choice,
no launcher key; only the output's allocation and the launch.
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

from ryzen_opt.kernels import reference, registry
from ryzen_opt.kernels.triton import _common, _launcher
from ryzen_opt.kernels.triton._launcher import CachedLauncher

# fmt: off
# Kernel signatures and launches keep their arguments grouped by role (pointers, sizes,
# strides, meta-parameters) on shared lines, as STYLE.md asks; the formatter would split them
# one per line.

_ACTIVATION_CODE = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "relu": 4}
# Skinny M goes to split-K when the plain tiling would fill fewer than half the SMs.
_SKINNY_M = 64
# 228 KB of shared memory per SM on Hopper, ~1 KB reserved; configs above are dropped before
# compiling rather than failing in ptxas.
_SMEM_LIMIT = 220 * 1024


def _config(bm, bn, bk, group, stages, warps, persistent=False):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "PERSISTENT": persistent},
        num_stages=stages,
        num_warps=warps,
    )


def _matmul_configs():
    if _common.INTERPRET:
        # One config: the interpreter cannot time candidates, and 32x32x32 tiles keep the
        # NumPy work per program small.
        return [_config(32, 32, 32, 4, 1, 4)]
    return [
        # Large square problems: 128x256 tiles give the highest arithmetic intensity that fits
        # 3 stages of bf16 operands (3 * (128*64 + 64*256) * 2 B = 144 KB).
        _config(128, 256, 64, 8, 3, 8),
        _config(128, 256, 64, 8, 4, 8),  # 4 stages: 192 KB, fits the 227 KB of an H100 SM
        _config(256, 128, 64, 8, 3, 8),
        _config(128, 256, 64, 8, 3, 8, persistent=True),
        _config(128, 128, 64, 8, 4, 8),
        _config(128, 128, 64, 8, 4, 8, persistent=True),
        _config(128, 64, 64, 8, 4, 4),
        _config(64, 128, 64, 8, 4, 4),
        _config(64, 64, 64, 8, 4, 4),
        # fp32 (TF32) operands take twice the shared memory per element: K=32 slices.
        _config(128, 128, 32, 8, 3, 8),
        _config(64, 64, 32, 8, 4, 4),
        # M in 17..64 when split-K is not used (small K).
        _config(32, 64, 64, 8, 4, 4),
        _config(16, 64, 64, 8, 4, 4),
    ]


def _smem_bytes(cfg, elt):
    kw = cfg.kwargs
    return cfg.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * elt


def _prune_matmul(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    m, n = named_args["M"], named_args["N"]
    elt = named_args["a_ptr"].element_size()
    kept = []
    for cfg in configs:
        kw = cfg.kwargs
        if _smem_bytes(cfg, elt) > _SMEM_LIMIT:
            continue
        if elt == 4 and kw["BLOCK_K"] > 32 and kw["BLOCK_M"] >= 128:
            continue  # fp32 big tiles: ptxas spills at BLOCK_K=64 with 8 warps
        if elt < 4 and kw["BLOCK_K"] == 32:
            continue  # 16-bit: BLOCK_K=32 halves the work per pipeline stage for no gain
        # A tile more than twice the problem along M or N only multiplies masked work.
        if kw["BLOCK_M"] > 2 * max(m, 16) or kw["BLOCK_N"] > 2 * max(n, 16):
            continue
        if m > _SKINNY_M and kw["BLOCK_M"] < 64:
            continue
        kept.append(cfg)
    return kept or configs[-1:]


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    # GELU and SiLU are 0 in fp32 below -88 (|x| * e**x < 1e-36); the select keeps x = -inf
    # at that limit, where the formulas give -inf * 0 = NaN.
    if ACTIVATION == 1:  # gelu (erf)
        x = tl.where(x < -88.0, 0.0, 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476)))
    elif ACTIVATION == 2:  # gelu (tanh approximation); tanh(u) = 2 * sigmoid(2u) - 1
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = tl.where(x < -88.0, 0.0, x * tl.sigmoid(2.0 * u))
    elif ACTIVATION == 3:  # silu
        x = tl.where(x < -88.0, 0.0, x * tl.sigmoid(x))
    elif ACTIVATION == 4:  # relu
        x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) is NaN, as torch
    return x


@triton.jit
def _epilogue(
    acc, offs_m, offs_n, M, N,
    c_ptr, stride_cm, stride_cn,
    bias_ptr, stride_bias,
    res_ptr, stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=offs_n < N, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    acc = _activate(acc, ACTIVATION)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                      mask=mask, other=0.0)
        acc = acc + res.to(tl.float32)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_tile(
    tile_id, pid_b,
    a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr,
    M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_bias, stride_rb, stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row-tiles share each column of B while it is hot in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapping the edge rows/columns keeps loads unmasked along M and N; the hint keeps 16-byte
    # vector loads (wrapping preserves 8-element groups whenever the stride allows vectors).
    offs_am = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + pid_b * stride_ab + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + pid_b * stride_bb + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    _epilogue(
        acc, offs_m, offs_n, M, N,
        c_ptr + pid_b * stride_cb, stride_cm, stride_cn,
        bias_ptr, stride_bias,
        res_ptr + pid_b * stride_rb, stride_rm, stride_rn,
        HAS_BIAS, ACTIVATION, HAS_RESIDUAL,
    )


@triton.jit
def _matmul_kernel_body(
    # pointers
    a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr,
    # sizes (M_KEY/N_KEY/K_KEY are power-of-two buckets, used only as the autotune key)
    M, N, K, M_KEY, N_KEY, K_KEY, NUM_SMS,
    # strides
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_bias, stride_rb, stride_rm, stride_rn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)  # batch offsets can pass 2**31 elements
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile_id in range(pid, num_tiles, NUM_SMS):
            _matmul_tile(
                tile_id, pid_b, a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, M, N, K,
                stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
                stride_cb, stride_cm, stride_cn, stride_bias, stride_rb, stride_rm, stride_rn,
                HAS_BIAS, ACTIVATION, HAS_RESIDUAL, INPUT_PRECISION, UPCAST, EVEN_K,
                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
            )
    else:
        _matmul_tile(
            pid, pid_b, a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr, M, N, K,
            stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
            stride_cb, stride_cm, stride_cn, stride_bias, stride_rb, stride_rm, stride_rn,
            HAS_BIAS, ACTIVATION, HAS_RESIDUAL, INPUT_PRECISION, UPCAST, EVEN_K,
            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )


_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
_matmul_kernel = triton.autotune(
    configs=_matmul_configs(),
    # The epilogue is in the key: erf-GELU on a 128x256 fp32 tile needs registers that a
    # plain store does not, so the best tile can differ.
    key=["M_KEY", "N_KEY", "K_KEY", "ACTIVATION"],
    prune_configs_by={"early_config_prune": _prune_matmul},
)(_even_k(_matmul_kernel_body))
# The same kernel without the autotuner, for launching one named config (tests, benchmarks).
_matmul_kernel_fixed = _even_k(_matmul_kernel_body)


# ---- Hopper: a persistent kernel whose operands and output move by TMA --------------------
#
# On an H200, for the MLP up-projection 8192 x 4096 -> 16384 in the nn.Linear layout
# (``b = W.t()``, K contiguous), the pointer kernel above ran at 0.84x of cuBLAS plain and its
# fused bias + GELU at 0.82x of ``gelu(addmm)``; this kernel, with ``tl.range(flatten=True)``
# (one tile's epilogue scheduled beside the next tile's loads) and the output stored by TMA in
# two column halves, ran at 1.01x and 1.00x (``bench/gpu/matmul_probe.py tma``,
# ``bench/results/h200/matmul_probe-tma.log``). Used on sm_90+ for 16-bit operands whose rows
# are contiguous and 16-byte aligned, outside split-K and the small-problem config.


def _tma_configs():
    if _common.INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4,
                               "FLATTEN": False, "EPI_SPLIT": 2, "PER_SM": 1},
                              num_stages=1, num_warps=4)]
    out = []
    for bm, bn, stages, warps, split in ((128, 256, 3, 8, 2), (128, 256, 4, 8, 2),
                                         (128, 128, 4, 4, 1), (128, 128, 4, 8, 1)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8,
                                  "FLATTEN": True, "EPI_SPLIT": split, "PER_SM": 1},
                                 num_stages=stages, num_warps=warps))
    # Not a candidate: two programs an SM (128x128, 3 stages, 4 warps, unflattened; the warp
    # scheduler runs one program's epilogue beside the other's main loop). In one probe it led
    # with bias + GELU (1.006x gelu(addmm) at 8192 x 4096 -> 16384, 0.938x at 8192 x 1024 ->
    # 8192; ``bench/results/h200/tile_probe-fused.log``), but the autotuner never chose it over
    # the configs above (``triton_kernels-matmul-per_sm.json``): within the noise. PER_SM
    # stays a grid knob (tests, ``bench/gpu/tile_probe.py fused``).
    return out


def _prune_tma(configs, named_args, **kwargs):
    m, n = named_args["M"], named_args["N"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= 2 * max(m, 16) and c.kwargs["BLOCK_N"] <= 2 * max(n, 16)]
    return kept or configs[-1:]


@triton.jit
def _tma_tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    per_group = GROUP_M * num_pid_n
    first_m = (tile_id // per_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile_id % per_group) % size_m, (tile_id % per_group) // size_m


@triton.jit
def _tma_store_part(
    c_desc, part, om, on, M, N,
    bias_ptr, stride_bias, res_ptr, stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
):
    offs_n = on + tl.arange(0, WIDTH)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=offs_n < N, other=0.0)
        part = part + bias.to(tl.float32)[None, :]
    part = _activate(part, ACTIVATION)
    if HAS_RESIDUAL:
        offs_m = om + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                      mask=mask, other=0.0)
        part = part + res.to(tl.float32)
    c_desc.store([om, on], part.to(c_desc.dtype))  # TMA clips the rows and columns past M, N


@triton.jit
def _matmul_tma_body(
    # pointers
    a_ptr, b_ptr, c_ptr, bias_ptr, res_ptr,
    # sizes (M_KEY/N_KEY/K_KEY: power-of-two buckets, the autotune key)
    M, N, K, M_KEY, N_KEY, K_KEY,
    # strides (the unit strides are implied: rows of A, B and C are contiguous)
    stride_am, stride_b, stride_cm, stride_bias, stride_rm, stride_rn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    B_KN: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr, EPI_SPLIT: tl.constexpr, PER_SM: tl.constexpr,
    WARP_SPEC: tl.constexpr = False,
):
    # The grid is PER_SM programs an SM (at most one a tile; PER_SM is read by the grid only),
    # and the programs stride over the tiles. WARP_SPEC: Triton's warp specialization of the
    # tile loop (probes only: no gain on an H200 with Triton 3.6).
    # B is W (N, K) with K contiguous (b = W.t(), the nn.Linear layout; W's row stride is
    # stride_b), or with B_KN a (K, N) with N contiguous. The descriptors' bounds replace the
    # masks: reads past M, N or K give zeros, stores past M or N are dropped.
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    if B_KN:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                       block_shape=[BLOCK_M, BLOCK_N // EPI_SPLIT])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    start = tl.program_id(0)
    programs = tl.num_programs(0)
    tile_out = start - programs
    for tile_id in tl.range(start, num_tiles, programs, flatten=FLATTEN,
                            warp_specialize=WARP_SPEC):
        pid_m, pid_n = _tma_tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            ok = ki * BLOCK_K
            a = a_desc.load([om, ok])
            if B_KN:  # noqa: SIM108 - a constexpr branch in a Triton kernel
                b = b_desc.load([ok, on])
            else:
                b = b_desc.load([on, ok]).T
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        # The output tile's coordinates are recomputed, not kept live across the K loop.
        tile_out += programs
        pid_m, pid_n = _tma_tile_coords(tile_out, num_pid_m, num_pid_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        if EPI_SPLIT == 1:
            _tma_store_part(c_desc, acc, om, on, M, N, bias_ptr, stride_bias,
                            res_ptr, stride_rm, stride_rn, HAS_BIAS, ACTIVATION, HAS_RESIDUAL,
                            BLOCK_M, BLOCK_N)
        else:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            _tma_store_part(c_desc, left, om, on, M, N, bias_ptr, stride_bias,
                            res_ptr, stride_rm, stride_rn, HAS_BIAS, ACTIVATION, HAS_RESIDUAL,
                            BLOCK_M, BLOCK_N // 2)
            _tma_store_part(c_desc, right, om, on + BLOCK_N // 2, M, N, bias_ptr, stride_bias,
                            res_ptr, stride_rm, stride_rn, HAS_BIAS, ACTIVATION, HAS_RESIDUAL,
                            BLOCK_M, BLOCK_N // 2)


_matmul_tma_kernel = triton.autotune(
    configs=_tma_configs(),
    key=["M_KEY", "N_KEY", "K_KEY", "ACTIVATION", "B_KN"],
    prune_configs_by={"early_config_prune": _prune_tma},
)(_matmul_tma_body)


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the kernels' device-side tensor descriptors (Triton asks for it at
    launch through the allocator set with ``triton.set_allocator``)."""
    device = "cpu" if _common.INTERPRET else torch.device("cuda", torch.cuda.current_device())
    return torch.empty(size, device=device, dtype=torch.int8)


try:  # the allocator lives in a context variable: unset in every new thread
    from triton.runtime import _allocation as _tma_alloc_state

    _NULL_ALLOCATOR = _tma_alloc_state.NullAllocator
except (ImportError, AttributeError):  # pragma: no cover - another Triton layout
    _tma_alloc_state = None
    _NULL_ALLOCATOR = None


def _ensure_tma_allocator() -> None:
    """Set :func:`_tma_scratch` as Triton's allocator where none is set (this thread's
    context); an allocator the user set is kept."""
    if _tma_alloc_state is None or isinstance(_tma_alloc_state._allocator.get(), _NULL_ALLOCATOR):
        triton.set_allocator(_tma_scratch)


def _aligned_rows(t: torch.Tensor, row_stride: int) -> bool:
    return t.data_ptr() % 16 == 0 and (row_stride * t.element_size()) % 16 == 0


def _tma_layout(a, b, c, batch: int) -> int | None:
    """``0`` (B is W.t(), K contiguous), ``1`` (B contiguous) or ``None`` (no TMA path)."""
    if batch != 1 or a.dim() != 2 or b.dim() != 2 or a.dtype not in (torch.float16, torch.bfloat16):
        return None
    if a.stride(1) != 1 or not _aligned_rows(a, a.stride(0)) or not _aligned_rows(c, c.stride(0)):
        return None
    if b.stride(0) == 1 and b.shape[1] > 1 and _aligned_rows(b, b.stride(1)):
        return 0
    if b.stride(1) == 1 and _aligned_rows(b, b.stride(0)):
        return 1
    return None


def _tma_available(device_index: int) -> bool:
    """TMA descriptors: sm_90 and newer, the same condition as programmatic dependent launch
    (the interpreter runs the kernel only when asked)."""
    return not _common.INTERPRET and _common.pdl_supported(device_index)


def _splitk_configs():
    if _common.INTERPRET:
        return [_config(16, 32, 32, 1, 1, 4)]
    # Skinny M is bandwidth-bound on B: K slices of 128-256 keep 3-4 loads of 16-32 KB in
    # flight per SM; BLOCK_M=16 is the smallest tile the tensor cores take.
    out = []
    for bm in (16, 32, 64):
        for bn, bk, stages in ((64, 128, 4), (128, 128, 3), (64, 256, 3)):
            out.append(_config(bm, bn, bk, 1, stages, 4))
    return out


def _prune_splitk(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    bm = max(16, _common.next_pow2(named_args["M"]))
    return [c for c in configs if c.kwargs["BLOCK_M"] == bm] or configs[:1]


@triton.autotune(
    configs=_splitk_configs(),
    # ONE_PASS is not in the key: the main loop is the same work either way, and a key of its
    # own would autotune (time kernels) inside a CUDA-graph capture after eager warm-up calls.
    key=["M_KEY", "N_KEY", "K_KEY", "SPLIT_K", "ACTIVATION"],
    prune_configs_by={"early_config_prune": _prune_splitk},
)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % (a["BLOCK_K"] * a["SPLIT_K"]) == 0})
@triton.jit
def _matmul_splitk_kernel(
    # pointers (counters: one int32 per output tile, zero between calls)
    a_ptr, b_ptr, ws_ptr, count_ptr, c_ptr, bias_ptr, res_ptr,
    # sizes
    M, N, K, M_KEY, N_KEY, K_KEY,
    # strides (the workspace is contiguous (SPLIT_K, batch, M, N))
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_wk, stride_wb,
    stride_cb, stride_cm, stride_cn,
    stride_bias, stride_rb, stride_rm, stride_rn,
    # meta-parameters
    SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, EVEN_K: tl.constexpr,
):
    # ONE_PASS=False: store the partial and stop (_splitk_reduce_kernel sums). ONE_PASS: every
    # program writes its K slice's fp32 partial, then counts itself in on the tile's counter;
    # the last to arrive sums the SPLIT_K partials in split order (the same rounding whichever
    # program is last), applies the epilogue and re-zeroes the counter.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_am = offs_m % M
    offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = min(K, k_lo + k_per_split)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + pid_b * stride_ab + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + pid_b * stride_bb + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            # Unmasked: a mask along K, the contiguous dim of nn.Linear weights (b = w.t()),
            # splits 16-byte loads into 2-byte ones (M=1, 4096^2: 0.196 ms -> cuBLAS 0.020).
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = k_hi - k0
            a = tl.load(a_ptrs, mask=tl.arange(0, BLOCK_K)[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=tl.arange(0, BLOCK_K)[:, None] < k_left, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ws = ws_ptr + pid_b * stride_wb + offs_m[:, None] * N + offs_n[None, :]
    tl.store(ws + pid_k * stride_wk, acc, mask=mask)
    if not ONE_PASS:
        return
    # Every thread's partial is stored before the release of the count (bar.sync, then a
    # gpu-scope acq_rel atomic); the last program's acquire makes all partials visible.
    tl.debug_barrier()
    counter = count_ptr + pid_b * tl.num_programs(0) + pid
    arrived = tl.atomic_add(counter, 1, sem="acq_rel")
    if arrived == SPLIT_K - 1:
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(SPLIT_K):
            total += tl.load(ws + s * stride_wk, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(counter, 0)
        _epilogue(
            total, offs_m, offs_n, M, N,
            c_ptr + pid_b * stride_cb, stride_cm, stride_cn,
            bias_ptr, stride_bias,
            res_ptr + pid_b * stride_rb, stride_rm, stride_rn,
            HAS_BIAS, ACTIVATION, HAS_RESIDUAL,
        )


@triton.jit
def _splitk_reduce_kernel(
    # pointers
    ws_ptr, c_ptr, bias_ptr, res_ptr,
    # sizes
    M, N,
    # strides (the workspace as in _matmul_splitk_kernel)
    stride_wk, stride_wb, stride_cb, stride_cm, stride_cn,
    stride_bias, stride_rb, stride_rm, stride_rn,
    # meta-parameters
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The second launch of a two-pass split-K: the partials summed in split order (the same
    # order as the one-pass kernel's last program), then the epilogue.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ws = ws_ptr + pid_b * stride_wb + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ws + s * stride_wk, mask=mask, other=0.0)
    _epilogue(
        acc, offs_m, offs_n, M, N,
        c_ptr + pid_b * stride_cb, stride_cm, stride_cn,
        bias_ptr, stride_bias,
        res_ptr + pid_b * stride_rb, stride_rm, stride_rn,
        HAS_BIAS, ACTIVATION, HAS_RESIDUAL,
    )


def _split_k_one_pass(device: torch.device) -> bool:
    """Whether split-K sums its partials in the same launch (else in a second kernel).

    Eager calls are bound by host time: one launch fewer saved 20-50 us a call on an H200.
    Under CUDA-graph capture launches cost no host time, and two passes took less GPU time in
    14 of 18 skinny shapes (M 1-64, up to 2.6 us of ~10 at 4096x4096): the last program of
    each tile summing every partial serially is a tail the second kernel spreads out
    (``bench/results/h200/splitk_one_vs_two_pass.log``)."""
    return device.type != "cuda" or not torch._C._cuda_isCurrentStreamCapturing()


def _split_k(m: int, n: int, k: int, batch: int, sms: int) -> int:
    """K splits for skinny M: none once 128-wide output tiles cover half the SMs, else about
    one wave of tiles (128 wide, 256 at M=1: see :func:`_skinny_config`), each K slice >= 256
    deep.

    On an H200 at N=11008, K=4096 one unsplit 128 x 128 tile per program streamed W at
    cuBLAS's speed (M=16/32/64: 0.97-1.02x in graph replay) where two splits of 64-wide tiles
    ran at 0.70-0.91x (``bench/results/h200/tile_probe-skinny*.log``; M=2-15 use M=16's
    tile)."""
    if m > _SKINNY_M or k < 512:
        return 1
    tiles = _common.cdiv(n, 128) * _common.cdiv(m, 64) * batch
    if 2 * tiles >= sms:
        return 1
    if m == 1:
        tiles = _common.cdiv(n, 256) * batch
    split = min(k // 256, _common.cdiv(sms, tiles))
    if split <= 1:
        return 1
    return 1 << (split.bit_length() - 1)  # a power of two, so autotune keys stay few


@functools.lru_cache(maxsize=8)
def _smem_per_block(device_index: int) -> int:
    """Shared memory one program may use (opt-in maximum), bytes; 0 where unknown."""
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 0)


def _skinny_config(m: int, k: int, elt: int, device_index: int, split: int) -> dict | None:
    """The fixed tile of skinny 16-bit calls (M <= 64, K >= 512) on sm_90+, for the split-K
    and the unsplit pointer kernel alike; ``None`` elsewhere (the autotuner picks).

    BLOCK_M x 128 tiles (BLOCK_M: M rounded up to a power of two, 16-64), K slices of 128,
    4 stages: within 3% of the best of 24 configs x 4 split
    counts in every shape of ``bench/gpu/tile_probe.py skinny`` (M 1-64; W 4096 x 4096,
    11008 x 4096, 4096 x 11008; graph replay on an H200), where the autotuned choice (timed
    eagerly, one-pass) ran up to 12% slower (M=1, 4096 x 4096: 11.3 vs 9.9 us). A fixed tile
    also leaves nothing to autotune under CUDA-graph capture."""
    if m > _SKINNY_M or k < 512 or elt != 2 or not _tma_available(device_index):
        return None
    if m == 1 and split > 1:
        # One row split over K (batch-1 decode, N up to ~8k): 16 x 256 tiles, K slices of
        # 64, 8 warps, 4 stages. At 4096 x 4096, eight splits of them took 8.0 us against
        # cuBLAS's 10.1 (1.27x; the 128-wide tile at four splits 1.04x); at 11008 x 4096 four
        # splits of them ran at 0.83x where the unsplit 128-wide tile gave 0.885x
        # (``bench/results/h200/tile_probe-skinny-m1.log``, ``triton_kernels-matmul-m1.log``).
        cfg = {"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 1,
               "PERSISTENT": False, "num_warps": 8, "num_stages": 4}
        need = (16 + 256) * 64 * 2 * 4 + 4096
        return cfg if need <= _smem_per_block(device_index) else None
    bm = max(16, _common.next_pow2(m))
    cfg = {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1, "PERSISTENT": False,
           "num_warps": 4, "num_stages": 4}
    need = (bm + 128) * 128 * 2 * 4 + 4096  # the staged tiles, and room for the epilogue
    return cfg if need <= _smem_per_block(device_index) else None


def supports(a, b, bias=None, activation=None, residual=None, out_dtype=None) -> str | None:
    """``None`` if the Triton matmul can serve this call, else the reason."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None  # the launcher raises the TypeError that names the argument
    for name, t in (("a", a), ("b", b), ("bias", bias), ("residual", residual)):
        if isinstance(t, torch.Tensor) and (reason := _common.device_reason(name, t)):
            return reason
    if a.dtype not in _common.KERNEL_DTYPES:
        return f"a is {a.dtype}; the triton matmul takes float16, bfloat16 or float32"
    if a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return (
            "a is float32 and torch.backends.cuda.matmul.allow_tf32 is False; the triton "
            "matmul computes fp32 only through TF32"
        )
    if isinstance(out_dtype, torch.dtype) and out_dtype not in _common.KERNEL_DTYPES:
        return f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}"
    return None


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, row, column) strides of a 2-D or 3-D operand; the batch stride is 0 when the
    batch broadcasts (2-D, or a batch of 1). No 3-D view is made: a view costs host time."""
    st = t.stride()
    if len(st) == 2:
        return 0, st[0], st[1]
    return (st[0] if t.shape[0] != 1 else 0), st[1], st[2]


def _small_config(m: int, elt: int) -> dict:
    # Problems under 2**27 multiply-adds (512^3) run in microseconds: timing a dozen configs
    # (each compiled per specialisation) costs seconds that the call never earns back.
    return {"BLOCK_M": 64 if m > 32 else max(16, _common.next_pow2(m)), "BLOCK_N": 64,
            "BLOCK_K": 32 if elt == 4 else 64, "GROUP_M": 8, "PERSISTENT": False,
            "num_warps": 4, "num_stages": 3}


def _launch(a, b, bias, activation, residual, out_dtype, config=None, plan_key=None, tma=None):
    """Launch the matmul; with ``plan_key`` (an eager call), remember how it was launched.

    ``config`` launches the pointer kernel with one fixed config; ``tma`` True forces the TMA
    kernel (tests, the interpreter; ValueError where the operands do not allow it), False
    keeps it off, None lets the rules in :func:`_tma_layout` decide on sm_90+."""
    out_shape = reference.matmul_out_shape(a, b)
    c = torch.empty(out_shape, device=a.device, dtype=out_dtype or a.dtype)
    if c.numel() == 0:
        return c
    batch = c.shape[0] if c.dim() == 3 else 1
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    sab, sam, sak = _strides3(a)
    sbb, sbk, sbn = _strides3(b)
    scb, scm, scn = _strides3(c)
    r3 = residual if residual is not None else c
    srb, srm, srn = _strides3(residual) if residual is not None else (0, 0, 0)
    bias_t, sbias = (bias, bias.stride(0)) if bias is not None else (c, 0)
    act = _ACTIVATION_CODE[activation]
    precision = _common.dot_precision(a.dtype)
    upcast = _common.upcast_dot(a.dtype)
    keys = (_common.pow2_bucket(m), _common.pow2_bucket(n), _common.pow2_bucket(k))
    sms = _common.num_sms(_common.device_index(a))
    split = _split_k(m, n, k, batch, sms) if config is None else 1
    skinny = None if config is not None else _skinny_config(m, k, a.element_size(),
                                                            _common.device_index(a), split)
    epilogue_meta = {
        "HAS_BIAS": bias is not None,
        "ACTIVATION": act,
        "HAS_RESIDUAL": residual is not None,
    }
    if split > 1:
        # Partials are overwritten before they are read; the counters are left zeroed by every
        # launch (the last program of each tile resets its own). Tiles of 16 x 16 bound the
        # tile count of any config. The two-pass kernel never reads its counters: an unzeroed
        # int32 placeholder (the dtype is part of the autotune key) adds no memset to a graph.
        ws = _common.stream_scratch("splitk_ws", a.device, split * batch * m * n, torch.float32)
        one_pass = _split_k_one_pass(a.device)
        if one_pass:
            counters = _common.stream_scratch(
                "splitk_counters", a.device, _common.cdiv(m, 16) * _common.cdiv(n, 16) * batch,
                torch.int32, zeroed=True,
            )
        else:
            counters = torch.empty(1, device=a.device, dtype=torch.int32)
        def splitk_grid(META):
            return (_common.cdiv(m, META["BLOCK_M"]) * _common.cdiv(n, META["BLOCK_N"]),
                    split, batch)

        args = (a, b, ws, counters, c, bias_t, r3, m, n, k, *keys,
                sab, sam, sak, sbb, sbk, sbn, m * n * batch, m * n,
                scb, scm, scn, sbias, srb, srm, srn)
        meta = {"SPLIT_K": split, "INPUT_PRECISION": precision, "UPCAST": upcast,
                "ONE_PASS": one_pass, **epilogue_meta}
        launch = _launch_splitk
        if skinny is not None:
            launch = _launch_splitk_fixed
            meta.update(skinny)
        launch(splitk_grid, *args, **meta)
        if plan_key is not None and one_pass and ws.numel() * 4 <= _common.KEEP_SCRATCH_BYTES:
            _remember(plan_key, launch, splitk_grid, args, meta, out_shape, c.dtype,
                      (ws, counters))
        if not one_pass:
            # 64 columns x 16 rows per program: 4 KB of fp32 partials per split, coalesced.
            rbm = min(16, _common.next_pow2(m))
            _launch_reduce(
                (_common.cdiv(m, rbm), _common.cdiv(n, 64), batch),
                ws, c, bias_t, r3, m, n, m * n * batch, m * n,
                scb, scm, scn, sbias, srb, srm, srn,
                SPLIT_K=split, BLOCK_M=rbm, BLOCK_N=64, num_warps=4, **epilogue_meta,
            )
        return c

    if skinny is not None and not tma:
        config = {**skinny, "GROUP_M": 8}  # one BLOCK_M x 128 tile a program, no split
    layout = None
    if config is None and (tma or (tma is None and m * n * k >= 2**27
                                   and _tma_available(_common.device_index(a)))):
        layout = _tma_layout(a, b, c, batch)
        if layout is None and tma:
            raise ValueError("tma=True needs 2-D float16/bfloat16 operands with contiguous, "
                             "16-byte aligned rows")
    if layout is not None:
        def tma_grid(META):
            tiles = _common.cdiv(m, META["BLOCK_M"]) * _common.cdiv(n, META["BLOCK_N"])
            return (min(META["PER_SM"] * sms, tiles),)

        _ensure_tma_allocator()
        args = (a, b, c, bias_t, r3, m, n, k, *keys,
                a.stride(0), b.stride(1) if layout == 0 else b.stride(0), c.stride(0),
                sbias, srm, srn)
        meta = {**epilogue_meta, "B_KN": layout == 1, "UPCAST": upcast}
        _launch_tma(tma_grid, *args, **meta)
        if plan_key is not None:
            _remember(plan_key, _launch_tma, tma_grid, args, meta, out_shape, c.dtype, (),
                      prepare=_ensure_tma_allocator)
        return c

    def grid(META):
        tiles = _common.cdiv(m, META["BLOCK_M"]) * _common.cdiv(n, META["BLOCK_N"])
        return (min(tiles, sms) if META["PERSISTENT"] else tiles, batch)

    args = (
        a, b, c, bias_t, r3, m, n, k, *keys, sms,
        sab, sam, sak, sbb, sbk, sbn, scb, scm, scn, sbias, srb, srm, srn,
    )
    meta = {"INPUT_PRECISION": precision, "UPCAST": upcast, **epilogue_meta}
    if config is None and not _common.INTERPRET and m * n * k < 2**27:
        config = _small_config(m, a.element_size())
    launcher = _launch_tuned if config is None else _launch_fixed
    if config is not None:
        meta.update(config)
    launcher(grid, *args, **meta)
    if plan_key is not None:
        _remember(plan_key, launcher, grid, args, meta, out_shape, c.dtype, ())
    return c


class _EagerPlan:
    """One eager call signature's launch, replayed without Triton's Python layer or ours.

    It holds the compiled kernel the first call launched, its grid, its integer arguments
    and constexpr values, and the split-K scratch buffers of the stream it ran on (kept
    alive here; the counters stay zeroed by every launch). A replay allocates the output and
    launches with the tensors' addresses as integers, which the compiled launcher takes
    as they are (a tensor would cost it a ``data_ptr`` call and a driver pointer query)."""

    __slots__ = ("shape", "dtype", "run", "grid", "stream", "function", "packed", "scratch",
                 "pre", "rest", "prepare")

    def __init__(self, compiled, grid, stream, shape, dtype, scratch, ints, tail, prepare):
        self.prepare = prepare  # a call made before each launch (the TMA kernel's allocator)
        self.shape, self.dtype, self.stream = shape, dtype, stream
        self.run, self.function = compiled.run, compiled.function
        self.packed = compiled.packed_metadata
        self.grid = grid
        self.scratch = scratch
        self.pre = tuple(t.data_ptr() for t in scratch)
        self.rest = (*ints, *tail)

    def __call__(self, a, b, bias, residual):
        if self.prepare is not None:
            self.prepare()
        c = torch.empty(self.shape, device=a.device, dtype=self.dtype)
        cp = c.data_ptr()
        g = self.grid
        self.run(g[0], g[1], g[2], self.stream, self.function, self.packed, None, None, None,
                 a.data_ptr(), b.data_ptr(), *self.pre, cp,
                 cp if bias is None else bias.data_ptr(),
                 cp if residual is None else residual.data_ptr(), *self.rest)
        return c


# Eager plans by call signature (see matmul()); cleared when full, like the launchers' caches.
_PLANS: dict = {}
_MAX_PLANS = 256
_plan_state = {"enabled": True, "hits": 0, "misses": 0}


def eager_plans(flag: bool | None = None) -> bool:
    """Whether eager calls replay remembered launches (see :func:`matmul`); with ``flag``,
    turn them on or off (tests, benchmarks of the plain path) and clear them. Returns the
    setting before the call."""
    old = _plan_state["enabled"]
    if flag is not None:
        _plan_state["enabled"] = bool(flag)
        _PLANS.clear()
    return old


def _plan_failed(e: Exception) -> None:
    _plan_state["enabled"] = False
    _PLANS.clear()
    warnings.warn(
        f"ryzen_opt: replaying an eager matmul launch failed ({type(e).__name__}: {e}); "
        "eager matmuls take the checked path from now on",
        RuntimeWarning,
        stacklevel=3,
    )


def _remember(plan_key, launcher, grid, args, meta, shape, dtype, scratch, prepare=None):
    entry = launcher.entry(args, meta)
    if entry is None:
        return  # this call took Triton's own path: nothing to replay
    compiled, full_meta, tail = entry
    if getattr(compiled, "function", None) is None:
        return  # not loaded on the device yet (never launched through this object)
    g = grid(full_meta) if callable(grid) else grid
    g = (g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)
    tensors = 5 + len(scratch)  # a, b, scratch..., c, bias, residual
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[plan_key] = _EagerPlan(compiled, g, plan_key[-1], shape, dtype, scratch,
                                  args[tensors:], tail, prepare)


def _tensor_sig(t):
    """What a plan depends on in an optional tensor argument (None when absent)."""
    if t is None:
        return None
    if type(t) not in _PLAIN:
        raise TypeError  # the slow path validates it and names it
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plan_key(a, b, bias, activation, residual, out_dtype):
    """Everything the checks, the kernel choice and its compiled specialization read from an
    eager call: shapes, strides, dtypes, devices, 16-byte alignment, the options, TF32, and
    the current device and stream (the launch and the split-K scratch are per stream)."""
    if type(a) not in _PLAIN or type(b) not in _PLAIN or not a.is_cuda:
        raise TypeError
    device = torch._C._cuda_getDevice()
    return (a.shape, a.stride(), a.dtype, a.device, a.data_ptr() % 16 == 0,
            b.shape, b.stride(), b.dtype, b.device, b.data_ptr() % 16 == 0,
            _tensor_sig(bias), activation, _tensor_sig(residual), out_dtype,
            torch.backends.cuda.matmul.allow_tf32, device, _launcher.raw_stream(device))


# Eager calls at decode sizes are bound by host time: these launch the compiled kernels
# directly after the first call of each shape (see _launcher). M (a prefill's token count)
# and the batch strides it scales vary between calls; autotune keys read only M's bucket and
# EVEN_K reads K, so they are keyed on Triton's own specialization.
_launch_splitk = CachedLauncher(
    _matmul_splitk_kernel, loose=("M", "stride_ab", "stride_wb", "stride_cb", "stride_rb")
)
# The split-K kernel without the autotuner, for the fixed skinny tile (_skinny_config).
_launch_splitk_fixed = CachedLauncher(
    _matmul_splitk_kernel.fn, loose=("M", "stride_ab", "stride_wb", "stride_cb", "stride_rb")
)
_launch_reduce = CachedLauncher(_splitk_reduce_kernel, loose="ints")
_launch_tuned = CachedLauncher(_matmul_kernel, loose=("M", "stride_ab", "stride_cb", "stride_rb"))
_launch_fixed = CachedLauncher(
    _matmul_kernel_fixed, loose=("M", "stride_ab", "stride_cb", "stride_rb")
)
_launch_tma = CachedLauncher(_matmul_tma_kernel, loose=("M",))


@torch.library.custom_op("ryzen_opt::triton_matmul", mutates_args=())
def _matmul_op(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    return _launch(a, b, bias, activation, residual, out_dtype)


@_matmul_op.register_fake
def _(a, b, bias, activation, residual, out_dtype):
    return a.new_empty(reference.matmul_out_shape(a, b), dtype=out_dtype or a.dtype)


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``activation(a @ b + bias) + residual`` on the GPU (see :func:`reference.matmul`).

    Args:
        a: ``(M, K)`` or ``(B, M, K)``, any strides, float16/bfloat16 (float32 with TF32).
        b: ``(K, N)`` or ``(B, K, N)``, same dtype.
        bias: optional ``(N,)``.
        activation: ``None``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``"relu"``.
        residual: optional tensor of the output's shape, added after the activation.
        out_dtype: output dtype (default ``a.dtype``).

    Returns:
        The ``(M, N)`` or ``(B, M, N)`` product, fp32-accumulated.

    Eager calls remember, per call signature, the launch they made (at most 256 signatures;
    :func:`eager_plans` turns this off): a repeated call (a decode step's projections) only
    allocates its output and launches, bitwise equal to the checked path. A signature covers
    everything the checks and the kernel choice read, so a call that differs in any of them
    (a shape, a stride, a device, an alignment, TF32, the stream) takes the checked path.

    Example:
        >>> y = matmul(x, w.t(), bias=b, activation="gelu")  # doctest: +SKIP
    """
    plan_key = None
    if (
        _plan_state["enabled"]
        and _launcher.enabled()
        and not torch.compiler.is_compiling()
        and not _launcher.hooks_installed()
        and not torch._C._cuda_isCurrentStreamCapturing()
    ):
        try:
            plan_key = _plan_key(a, b, bias, activation, residual, out_dtype)
        except (TypeError, AttributeError, RuntimeError):
            plan_key = None  # not plain CUDA tensors: the checks below say what is wrong
        else:
            plan = _PLANS.get(plan_key)
            if plan is not None:
                # This exact signature passed the checks below and launched before.
                try:
                    out = plan(a, b, bias, residual)
                except Exception as e:  # noqa: BLE001 - any failure: the plain path, for good
                    _plan_failed(e)
                    plan_key = None
                else:
                    _plan_state["hits"] += 1
                    return out
            else:
                _plan_state["misses"] += 1
    reference.check_matmul_args(a, b, bias, activation, residual, out_dtype)
    for name, t in (("a", a), ("b", b), ("bias", bias), ("residual", residual)):
        if t is not None:
            _common.check_device(name, t)
    reason = supports(a, b, bias, activation, residual, out_dtype)
    if reason is not None:
        raise TypeError(reason)
    if torch.compiler.is_compiling():
        return _matmul_op(a, b, bias, activation, residual, out_dtype)
    # Eager calls skip the custom-op dispatcher. With it and a meta-tensor shape check, a
    # 4096^3 bf16 call took 0.348 ms against 0.211 ms for the same kernel launched directly
    # (H100, torch 2.11): host time, not GPU time.
    return _launch(a, b, bias, activation, residual, out_dtype, plan_key=plan_key)


registry.register(
    "matmul", "triton", _common.DEVICES, matmul, supports=supports, available=_common.available
)
