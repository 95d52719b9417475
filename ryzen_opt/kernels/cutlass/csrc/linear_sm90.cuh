// Hopper (sm_90a) GEMMs with fused epilogues, instantiated from CUTLASS's collective builders:
//
//   out (M, N) row-major = act(x (M, K) row-major @ w^T [+ bias (N)])
//
// bf16 in and out, fp32 accumulation and epilogue math. The weight operand is either an
// nn.Linear weight w (N, K) row-major (layout ColumnMajor: K-major on both operands, what
// Hopper's tensor cores read without a transpose) or b (K, N) row-major (layout RowMajor).
// ryzen_opt/kernels/cutlass/_build.py compiles one kernel a shared library from this header;
// bench/gpu/cutlass_probe.py instantiates other tiles and schedules from it for comparison.
#pragma once

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace rzo {

// Error codes returned to Python (0 = launched).
enum : int { kOk = 0, kCannotImplement = 1, kWorkspaceTooSmall = 2, kInitFailed = 3,
             kRunFailed = 4 };

template <class TileShape, class ClusterShape, class MainloopSchedule, class EpilogueSchedule,
          template <class> class Act, bool kBias, class Scheduler = void,
          class LayoutW_ = cutlass::layout::ColumnMajor>
struct Linear {
  using T = cutlass::bfloat16_t;
  using LayoutX = cutlass::layout::RowMajor;  // (M, K), K contiguous
  // ColumnMajor: w^T as (K, N) with K contiguous (an nn.Linear weight, w (N, K) row-major);
  // RowMajor: b (K, N) with N contiguous (a plain a @ b).
  using LayoutW = LayoutW_;
  using LayoutOut = cutlass::layout::RowMajor;
  static constexpr int kAlign = 16 / sizeof(T);  // 16-byte rows: TMA

  using Fusion = cute::conditional_t<
      kBias,
      cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Act, T, float, T, T, float>,
      cutlass::epilogue::fusion::LinCombEltAct<Act, T, float, T, float>>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutOut, kAlign,  // no source operand C
      T, LayoutOut, kAlign, EpilogueSchedule, Fusion>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutX, kAlign, T, LayoutW,
      kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop,
                                                      Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // swizzle: the persistent scheduler's tile-order swizzle (1, 2, 4 or 8 tiles; L2 reuse).
  static typename Gemm::Arguments arguments(const void* x, const void* w, const void* bias,
                                            void* out, int m, int n, int k, int sm_count,
                                            int swizzle = 1) {
    using StrideX = typename Kernel::StrideA;
    using StrideW = typename Kernel::StrideB;
    using StrideOut = typename Kernel::StrideD;
    auto sx = cutlass::make_cute_packed_stride(StrideX{}, cute::make_shape(m, k, 1));
    auto sw = cutlass::make_cute_packed_stride(StrideW{}, cute::make_shape(n, k, 1));
    auto so = cutlass::make_cute_packed_stride(StrideOut{}, cute::make_shape(m, n, 1));
    cutlass::KernelHardwareInfo hw;
    cudaGetDevice(&hw.device_id);
    hw.sm_count = sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const T*>(x), sx, static_cast<const T*>(w), sw},
        {{}, nullptr, so, static_cast<T*>(out), so},
        hw};
    args.scheduler.max_swizzle_size = swizzle;
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    if constexpr (kBias) {
      args.epilogue.thread.bias_ptr = static_cast<const T*>(bias);
    }
    return args;
  }

  static size_t workspace(int m, int n, int k, int sm_count) {
    return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, m, n, k,
                                              sm_count));
  }

  static int run(const void* x, const void* w, const void* bias, void* out, int m, int n, int k,
                 void* ws, size_t ws_bytes, int sm_count, cudaStream_t stream, int swizzle = 1) {
    auto args = arguments(x, w, bias, out, m, n, k, sm_count, swizzle);
    Gemm op;
    if (op.can_implement(args) != cutlass::Status::kSuccess) return kCannotImplement;
    if (Gemm::get_workspace_size(args) > ws_bytes) return kWorkspaceTooSmall;
    if (op.initialize(args, ws, stream) != cutlass::Status::kSuccess) return kInitFailed;
    if (op.run(stream) != cutlass::Status::kSuccess) return kRunFailed;
    return kOk;
  }
};

}  // namespace rzo

// The two C entry points of one kernel (one kernel a shared library, loaded with ctypes).
#define RZO_EXPORT(KERNEL)                                                                   \
  extern "C" size_t rzo_workspace(int m, int n, int k, int sms) {                            \
    return KERNEL::workspace(m, n, k, sms);                                                  \
  }                                                                                          \
  extern "C" int rzo_run(const void* x, const void* w, const void* bias, void* out, int m,   \
                         int n, int k, void* ws, size_t ws_bytes, int sms, void* stream,      \
                         int swizzle) {                                                       \
    return KERNEL::run(x, w, bias, out, m, n, k, ws, ws_bytes, sms,                          \
                       static_cast<cudaStream_t>(stream), swizzle);                          \
  }
