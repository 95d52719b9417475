// Hopper (sm_90a) flash-attention forward, instantiated from the warp-specialized FMHA
// collectives that CUTLASS ships with its Hopper FMHA example (examples/88_hopper_fmha in the
// CUTLASS tree and in the nvidia-cutlass package; included from there, not copied):
//
//   o (b, h, q, d) = softmax(q k^T * scale [causal]) v,   lse (b, h, q) float32, natural log
//
// bf16 in and out, fp32 accumulation. What is ours: the masks (a bottom-right aligned causal
// mask, the library's convention when q_len != k_len, and the key-tail mask), the softmax
// scale as an argument (the collective hard-codes 1/sqrt(d)), and the C entry point taking
// arbitrary batch/head/sequence strides. Grouped-query heads are served by the caller folding
// (batch, kv head) into the batch mode and giving the query group a key/value head stride of 0.
// ryzen_opt/kernels/cutlass/_build.py compiles one kernel (head dim, tile, schedule, mask) a
// shared library from this header.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.h"

#include "collective/fmha_fusion.hpp"
#include "device/device_universal.hpp"
#include "kernel/fmha_kernel_builder.hpp"

namespace rzo::attn {

using namespace cute;

// Key tiles of one CTA (rows m0 .. m0 + BM - 1) that need a mask: keys at or past Lk, and for
// the causal mask keys past row + (Lk - Lq). The collective runs the unmasked tiles first,
// then the masked ones; it always masks its first tile.
template <bool kCausal>
struct Mask {
  template <class BlkCoord, class TileShape, class ProblemSize>
  CUTLASS_DEVICE int get_trip_count(BlkCoord const& blk, TileShape const& tile,
                                    ProblemSize const& ps) {
    int lk = get<3>(ps);
    int bn = get<1>(tile);
    int all = ceil_div(lk, bn);
    if constexpr (kCausal) {
      int last_key = (get<0>(blk) + 1) * get<0>(tile) - 1 + (lk - get<2>(ps));
      return max(0, min(all, last_key / bn + 1));
    }
    return all;
  }

  template <class BlkCoord, class TileShape, class ProblemSize>
  CUTLASS_DEVICE int get_unmasked_trip_count(BlkCoord const& blk, TileShape const& tile,
                                             ProblemSize const& ps) {
    int lk = get<3>(ps);
    int bn = get<1>(tile);
    int n = lk / bn;  // whole key tiles
    if constexpr (kCausal) {
      // Tiles every row of the CTA sees in full: keys <= m0 + (Lk - Lq).
      int first_key = get<0>(blk) * get<0>(tile) + (lk - get<2>(ps));
      n = min(n, max(0, (first_key + 1) / bn));
    }
    return min(n, get_trip_count(blk, tile, ps));
  }

  template <class BlkCoord, class TileShape, class ProblemSize>
  CUTLASS_DEVICE int get_masked_trip_count(BlkCoord const& blk, TileShape const& tile,
                                           ProblemSize const& ps) {
    return get_trip_count(blk, tile, ps) - get_unmasked_trip_count(blk, tile, ps);
  }

  template <class AccQK, class IndexQK, class ProblemSize>
  CUTLASS_DEVICE void before_softmax(AccQK& acc, IndexQK const& index, ProblemSize const& ps) {
    int lk = get<3>(ps);
    int offset = lk - get<2>(ps);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(acc); i++) {
      auto pos = index(i);
      bool out = get<1>(pos) >= lk;
      if constexpr (kCausal) out = out || get<1>(pos) > get<0>(pos) + offset;
      if (out) acc(i) = -INFINITY;
    }
  }
};

// The collective with the softmax scale taken from the arguments.
template <class Base>
struct ScaledMainloop : Base {
  struct Arguments : Base::Arguments {
    float scale;
  };

  template <class ProblemShape>
  static typename Base::Params to_underlying_arguments(ProblemShape const& ps,
                                                       Arguments const& args, void* ws) {
    auto p = Base::to_underlying_arguments(ps, static_cast<typename Base::Arguments const&>(args),
                                           ws);
    p.scale_softmax = args.scale;
    p.scale_softmax_log2 = args.scale * static_cast<float>(M_LOG2E);
    return p;
  }
};

// The schedulers with the query tiles taken heaviest first: under the causal mask a query tile
// further down sees more key tiles, and starting those first leaves the light ones to fill the
// last wave (the collective's schedulers start from the first query tile).
struct HeavyFirstTileScheduler : cutlass::fmha::kernel::IndividualTileScheduler {
  using Base = cutlass::fmha::kernel::IndividualTileScheduler;
  using Base::Base;
  CUTLASS_DEVICE auto get_block_coord() {
    return make_coord(static_cast<int>(gridDim.x - 1 - blockIdx.x), _0{},
                      make_coord(static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.z)));
  }
  CUTLASS_DEVICE HeavyFirstTileScheduler& operator++() {
    Base::operator++();
    return *this;
  }
};

struct HeavyFirstPersistentTileScheduler : cutlass::fmha::kernel::PersistentTileScheduler {
  using Base = cutlass::fmha::kernel::PersistentTileScheduler;
  using Base::Base;
  CUTLASS_DEVICE auto get_block_coord() {
    auto c = Base::get_block_coord();
    return make_coord(params.divmod_m_block.divisor - 1 - get<0>(c), _0{}, get<2>(c));
  }
  CUTLASS_DEVICE HeavyFirstPersistentTileScheduler& operator++() {
    Base::operator++();
    return *this;
  }
};

enum : int { kOk = 0, kCannotImplement = 1, kInitFailed = 3, kRunFailed = 4 };

// kPersistent: the persistent tile scheduler with the query tile loaded by its own warp (what
// the example calls ping-pong); otherwise one CTA a (query tile, batch, head). kWarpGroups:
// consumer warp groups, each owning TileShape's query rows / kWarpGroups. kHeavyFirst: the
// query tiles in reverse order (see HeavyFirstTileScheduler).
template <class TileShape, bool kCausal, bool kPersistent, int kWarpGroups = 2,
          bool kHeavyFirst = false>
struct Forward {
  using T = cutlass::bfloat16_t;
  using Stride = cute::tuple<int, _1, cute::tuple<int, int>>;  // (seq, dim, (batch, head))
  using StrideLSE = cute::tuple<_1, cute::tuple<int, int>>;
  using Fusion = Mask<kCausal>;
  using Persist = cutlass::fmha::kernel::Option<cutlass::fmha::kernel::Tag::kIsPersistent,
                                                cute::bool_constant<kPersistent>>;
  using SeparateQ = cutlass::fmha::kernel::Option<
      cutlass::fmha::kernel::Tag::kLoadsQSeparately, cute::bool_constant<kPersistent>>;
  using WarpGroups = cutlass::fmha::kernel::Option<
      cutlass::fmha::kernel::Tag::kNumMmaWarpGroups, cute::Int<kWarpGroups>>;
  using Inner = cutlass::fmha::collective::FmhaMainloopTmaWarpSpecialized<
      T, float, float, TileShape, Stride, Stride, Stride, Fusion, Persist, SeparateQ, WarpGroups>;
  using Mainloop = ScaledMainloop<Inner>;
  using Epilogue = cutlass::fmha::collective::FmhaFwdEpilogue<T, float,
                                                              typename Mainloop::TileShapePV>;
  using Scheduler = std::conditional_t<
      kPersistent,
      std::conditional_t<kHeavyFirst, HeavyFirstPersistentTileScheduler,
                         cutlass::fmha::kernel::PersistentTileScheduler>,
      std::conditional_t<kHeavyFirst, HeavyFirstTileScheduler,
                         cutlass::fmha::kernel::IndividualTileScheduler>>;
  using Kernel = cutlass::fmha::kernel::FmhaKernelTmaWarpSpecialized<Mainloop, Epilogue,
                                                                      Scheduler, Persist,
                                                                      SeparateQ, WarpGroups>;
  using Op = cutlass::device::Universal<Kernel>;

  // Strides in elements: s* = (batch, head, seq) of q, k, v, o; the head dim is contiguous.
  static int run(const void* q, const void* k, const void* v, void* o, float* lse, int b, int h,
                 int lq, int lk, int d, const long long* sq, const long long* sk,
                 const long long* sv, const long long* so, float scale, int sms,
                 cudaStream_t stream) {
    auto st = [](const long long* s) {
      return Stride{static_cast<int>(s[2]), _1{},
                    cute::make_tuple(static_cast<int>(s[0]), static_cast<int>(s[1]))};
    };
    cutlass::KernelHardwareInfo hw;
    cudaGetDevice(&hw.device_id);
    hw.sm_count = sms;
    typename Mainloop::Arguments main{};
    static_cast<typename Inner::Arguments&>(main) = {
        static_cast<const T*>(q), st(sq), static_cast<const T*>(k), st(sk),
        static_cast<const T*>(v), st(sv)};
    main.scale = scale;
    typename Op::Arguments args{
        {b, h, lq, lk, d},
        main,
        {static_cast<T*>(o), st(so), lse, StrideLSE{_1{}, cute::make_tuple(h * lq, lq)}},
        hw};
    if (Op::can_implement(args) != cutlass::Status::kSuccess) return kCannotImplement;
    Op op;
    if (op.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return kInitFailed;
    if (op.run(stream) != cutlass::Status::kSuccess) return kRunFailed;
    return kOk;
  }
};

}  // namespace rzo::attn

// The C entry point of one kernel (one kernel a shared library, loaded with ctypes).
#define RZO_ATTN_EXPORT(KERNEL)                                                              \
  extern "C" int rzo_attn_run(const void* q, const void* k, const void* v, void* o,          \
                              float* lse, int b, int h, int lq, int lk, int d,               \
                              const long long* sq, const long long* sk, const long long* sv,  \
                              const long long* so, float scale, int sms, void* stream) {     \
    return KERNEL::run(q, k, v, o, lse, b, h, lq, lk, d, sq, sk, sv, so, scale, sms,         \
                       static_cast<cudaStream_t>(stream));                                   \
  }
