// Cooperative 128x256 on b (K, N) row-major.
#include "probe.cuh"
using namespace cute;
using coop128x256_kn_tile = Shape<_128, _256, _64>;
using coop128x256_kn_cluster = Shape<_1, _2, _1>;
RZO_PROBE_VARIANT(coop128x256_kn, coop128x256_kn_tile, coop128x256_kn_cluster, cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative, void,
                  cutlass::layout::RowMajor)
