// The probe's variants: one tile/cluster/schedule a translation unit (they compile in
// parallel), each with a plain and a bias+GELU kernel as extern "C" entry points for ctypes.
#pragma once

#include "linear_sm90.cuh"  // ryzen_opt/kernels/cutlass/csrc

#define RZO_PROBE_VARIANT(NAME, TILE, CLUSTER, MAINLOOP, EPILOGUE, SCHEDULER, LAYOUT_W)         \
  using NAME##_plain = rzo::Linear<TILE, CLUSTER, MAINLOOP, EPILOGUE,                         \
                                   cutlass::epilogue::thread::Identity, false, SCHEDULER,     \
                                   LAYOUT_W>;                                                 \
  using NAME##_gelu = rzo::Linear<TILE, CLUSTER, MAINLOOP, EPILOGUE,                          \
                                  cutlass::epilogue::thread::GELU, true, SCHEDULER, LAYOUT_W>; \
  extern "C" size_t NAME##_workspace(int fused, int m, int n, int k, int sms) {               \
    return fused ? NAME##_gelu::workspace(m, n, k, sms)                                       \
                 : NAME##_plain::workspace(m, n, k, sms);                                     \
  }                                                                                           \
  extern "C" int NAME##_run(int fused, const void* x, const void* w, const void* bias,       \
                            void* out, int m, int n, int k, void* ws, size_t ws_bytes,        \
                            int sms, void* stream, int swizzle) {                             \
    auto s = static_cast<cudaStream_t>(stream);                                               \
    return fused ? NAME##_gelu::run(x, w, bias, out, m, n, k, ws, ws_bytes, sms, s, swizzle)  \
                 : NAME##_plain::run(x, w, bias, out, m, n, k, ws, ws_bytes, sms, s, swizzle);\
  }
