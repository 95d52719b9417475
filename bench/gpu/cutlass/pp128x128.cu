// Ping-pong: two consumer warp groups take turns, one's epilogue overlapping the other's MMAs.
#include "probe.cuh"
using namespace cute;
using pp128x128_tile = Shape<_128, _128, _64>;
using pp128x128_cluster = Shape<_1, _2, _1>;
RZO_PROBE_VARIANT(pp128x128, pp128x128_tile, pp128x128_cluster, cutlass::gemm::KernelTmaWarpSpecializedPingpong, cutlass::epilogue::TmaWarpSpecialized, void,
                  cutlass::layout::ColumnMajor)
