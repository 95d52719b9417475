// Cooperative, 256x128 tile, cluster 2x1.
#include "probe.cuh"
using namespace cute;
using coop256x128_tile = Shape<_256, _128, _64>;
using coop256x128_cluster = Shape<_2, _1, _1>;
RZO_PROBE_VARIANT(coop256x128, coop256x128_tile, coop256x128_cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative, void,
                  cutlass::layout::ColumnMajor)
