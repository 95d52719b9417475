// Stream-K cooperative 128x256 on b (K, N) row-major.
#include "probe.cuh"
using namespace cute;
using sk128x256_kn_tile = Shape<_128, _256, _64>;
using sk128x256_kn_cluster = Shape<_1, _2, _1>;
RZO_PROBE_VARIANT(sk128x256_kn, sk128x256_kn_tile, sk128x256_kn_cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler,
                  cutlass::layout::RowMajor)
