// Ping-pong on b (K, N) row-major.
#include "probe.cuh"
using namespace cute;
using pp128x128_kn_tile = Shape<_128, _128, _64>;
using pp128x128_kn_cluster = Shape<_1, _2, _1>;
RZO_PROBE_VARIANT(pp128x128_kn, pp128x128_kn_tile, pp128x128_kn_cluster, cutlass::gemm::KernelTmaWarpSpecializedPingpong, cutlass::epilogue::TmaWarpSpecialized, void,
                  cutlass::layout::RowMajor)
