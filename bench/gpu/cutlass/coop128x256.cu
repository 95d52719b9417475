// Cooperative: both consumer warp groups share one 128x256 tile.
#include "probe.cuh"
using namespace cute;
using coop128x256_tile = Shape<_128, _256, _64>;
using coop128x256_cluster = Shape<_1, _2, _1>;
RZO_PROBE_VARIANT(coop128x256, coop128x256_tile, coop128x256_cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative, void,
                  cutlass::layout::ColumnMajor)
