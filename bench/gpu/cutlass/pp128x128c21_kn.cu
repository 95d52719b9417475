// Ping-pong, cluster 2x1, on b (K, N) row-major: the library's kernel for a plain a @ b.
#include "probe.cuh"
using namespace cute;
using pp128x128c21_kn_tile = Shape<_128, _128, _64>;
using pp128x128c21_kn_cluster = Shape<_2, _1, _1>;
RZO_PROBE_VARIANT(pp128x128c21_kn, pp128x128c21_kn_tile, pp128x128c21_kn_cluster,
                  cutlass::gemm::KernelTmaWarpSpecializedPingpong, cutlass::epilogue::TmaWarpSpecialized,
                  void, cutlass::layout::RowMajor)
