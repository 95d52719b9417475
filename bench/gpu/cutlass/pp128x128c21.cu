// Ping-pong, cluster 2x1.
#include "probe.cuh"
using namespace cute;
using pp128x128c21_tile = Shape<_128, _128, _64>;
using pp128x128c21_cluster = Shape<_2, _1, _1>;
RZO_PROBE_VARIANT(pp128x128c21, pp128x128c21_tile, pp128x128c21_cluster, cutlass::gemm::KernelTmaWarpSpecializedPingpong, cutlass::epilogue::TmaWarpSpecialized, void,
                  cutlass::layout::ColumnMajor)
