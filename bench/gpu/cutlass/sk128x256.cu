// Cooperative 128x256 with the stream-K tile scheduler (splits the tail wave's K loops).
#include "probe.cuh"
using namespace cute;
using sk128x256_tile = Shape<_128, _256, _64>;
using sk128x256_cluster = Shape<_1, _2, _1>;
RZO_PROBE_VARIANT(sk128x256, sk128x256_tile, sk128x256_cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler,
                  cutlass::layout::ColumnMajor)
