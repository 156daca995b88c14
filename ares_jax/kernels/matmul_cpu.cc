// Small-batch matmul for XLA:CPU decode steps, called through the XLA FFI.
//
// y[M, N] = x[M, K] @ w[layer][K, N] for the few rows of a decode batch. The weight comes
// packed in 64-column strips, [L, N / 64, K, 64] (``matmul.pack``, once at engine start), so
// each strip is one contiguous block. Each thread streams a strip once per 8 rows of x, keeping
// 8 x 64 accumulators in registers, so the weights are read at memory speed whatever M is. The
// whole stacked weight goes in with a layer index: a custom call on one scanned layer's slice
// would copy it.
#include <algorithm>
#include <cstdint>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using ares_cpu::kLanes;
using ares_cpu::Load;
using ares_cpu::Store;
using ares_cpu::v16;

constexpr int64_t kStrip = 64;  // output columns per packed strip
constexpr int kNV = kStrip / kLanes;  // vectors per strip row

// Rows [0, MB) of x times one packed strip (w: [K, 64]), into columns n0.. of y.
template <int MB>
void Block(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t K,
           int64_t N, int64_t n0) {
  v16 acc[MB][kNV] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * kStrip;
    v16 wv[kNV];
    for (int j = 0; j < kNV; ++j) wv[j] = Load(wk + kLanes * j);
    for (int m = 0; m < MB; ++m) {
      const float xv = x[m * K + k];
      for (int j = 0; j < kNV; ++j) acc[m][j] += xv * wv[j];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < kNV; ++j) Store(y + m * N + n0 + kLanes * j, acc[m][j]);
}

void Strip(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
           int64_t n0) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const float* xm = x + m0 * K;
    float* ym = y + m0 * N;
    switch (std::min<int64_t>(8, M - m0)) {
      case 8: Block<8>(xm, w, ym, K, N, n0); break;
      case 7: Block<7>(xm, w, ym, K, N, n0); break;
      case 6: Block<6>(xm, w, ym, K, N, n0); break;
      case 5: Block<5>(xm, w, ym, K, N, n0); break;
      case 4: Block<4>(xm, w, ym, K, N, n0); break;
      case 3: Block<3>(xm, w, ym, K, N, n0); break;
      case 2: Block<2>(xm, w, ym, K, N, n0); break;
      default: Block<1>(xm, w, ym, K, N, n0); break;
    }
  }
}

ffi::Error LayerMatmulCpu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> layer,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[2] != xd[1] || wd[3] != kStrip)
    return ffi::Error::InvalidArgument(
        "layer_matmul_cpu: expected x [M,K] and packed w [L,N/64,K,64]");
  const int64_t M = xd[0], K = xd[1], L = wd[0], strips = wd[1], N = strips * kStrip;
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= L)
    return ffi::Error::InvalidArgument("layer_matmul_cpu: layer index out of range");
  const float* xp = x.typed_data();
  const float* wl = w.typed_data() + l * N * K;
  float* yp = y->typed_data();
  ares_cpu::ParallelFor(pool, strips, [=](int64_t i) {
    Strip(xp, wl + i * K * kStrip, yp, M, K, N, i * kStrip);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AresLayerMatmulCpu, LayerMatmulCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Ret<ffi::Buffer<ffi::F32>>());
