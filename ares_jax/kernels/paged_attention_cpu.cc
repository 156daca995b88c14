// Paged-attention decode for XLA:CPU, called through the XLA FFI.
//
// One query token per sequence attends to its cached tokens, read in place from their KV pages,
// plus its own new K/V. XLA's gather-then-einsum formulation writes a transposed copy of every
// sequence's cached K/V and reads it back; this reads each cached row once. Work is split over
// (sequence, kv head) pairs on XLA's intra-op thread pool.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using ares_cpu::kLanes;
using ares_cpu::Load;
using ares_cpu::Splat;
using ares_cpu::Store;
using ares_cpu::v16;
typedef int32_t v16i __attribute__((vector_size(64), aligned(4), may_alias));

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

inline float HSum(v16 x) {
  const v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline float HMax(v16 x) {
  float r = x[0];
  for (int i = 1; i < kLanes; ++i) r = std::max(r, x[i]);
  return r;
}

// exp(x) for x <= 0: Cody-Waite reduction to 2^n * e^r, |r| <= ln2/2, and a degree-6 polynomial
// for e^r (about 2 ulp). Inputs below -87 flush to 0, which is all a softmax needs.
inline v16 ExpNonPositive(v16 x) {
  x = x < -87.f ? Splat(-87.f) : x;
  const v16 fx = x * 1.44269504088896341f + 0.5f;
  v16i n = __builtin_convertvector(fx, v16i);  // truncates toward zero
  n -= (__builtin_convertvector(n, v16) > fx) ? 1 : 0;  // floor for negative fx
  const v16 nf = __builtin_convertvector(n, v16);
  const v16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  v16 p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v16 y = p * r * r + r + 1.f;
  const v16i bits = (n + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

struct Args {
  const float* q;         // [B, KVH, G, K]
  const float* k_self;    // [B, KVH, K]
  const float* v_self;    // [B, KVH, K]
  const float* k_layer;   // [P, S, KVH, K]
  const float* v_layer;   // [P, S, KVH, K]
  const int32_t* page_table;  // [B, W]
  const int32_t* positions;   // [B]: tokens cached before this one
  int64_t W, S, KVH, G, K;
  float scale;
  float* out;  // [B, KVH, G, K]
};

inline int64_t CachedTokens(const Args& a, int64_t b) {
  return std::min<int64_t>(std::max<int32_t>(a.positions[b], 0), a.W * a.S);
}

// One (sequence, kv head), head_dim a multiple of 16. For each of the G query heads: scores over
// the cached tokens and itself, a softmax, and the weighted sum of values. `s` is scratch.
template <int64_t K>
void AttendVectorized(const Args& a, int64_t b, int64_t h, std::vector<float>& s) {
  constexpr int64_t NV = K / kLanes;
  const int64_t S = a.S, row = a.KVH * K;
  const int64_t n = CachedTokens(a, b);
  const int64_t padded = (n + 1 + kLanes - 1) / kLanes * kLanes;
  s.resize(padded);
  const int32_t* pages = a.page_table + b * a.W;
  const float* ks = a.k_self + (b * a.KVH + h) * K;
  const float* vs = a.v_self + (b * a.KVH + h) * K;
  for (int64_t g = 0; g < a.G; ++g) {
    const float* qg = a.q + ((b * a.KVH + h) * a.G + g) * K;
    v16 qv[NV];
    for (int64_t c = 0; c < NV; ++c) qv[c] = Load(qg + kLanes * c) * a.scale;
    auto score = [&](const float* krow) {
      v16 acc = qv[0] * Load(krow);
      for (int64_t c = 1; c < NV; ++c) acc += qv[c] * Load(krow + kLanes * c);
      return HSum(acc);
    };
    for (int64_t j = 0, t = 0; t < n; ++j) {
      const float* kp = a.k_layer + pages[j] * S * row + h * K;
      for (int64_t u = 0, cnt = std::min(S, n - t); u < cnt; ++u, ++t) s[t] = score(kp + u * row);
    }
    s[n] = score(ks);
    std::fill(s.begin() + n + 1, s.end(), -1e30f);  // lanes past the last token weigh nothing
    v16 mv = Load(s.data());
    for (int64_t t = kLanes; t < padded; t += kLanes) mv = mv > Load(&s[t]) ? mv : Load(&s[t]);
    const float m = HMax(mv);
    v16 total = {};
    for (int64_t t = 0; t < padded; t += kLanes) {
      const v16 e = ExpNonPositive(Load(&s[t]) - m);
      Store(&s[t], e);
      total += e;
    }
    const float inv = 1.f / HSum(total);
    v16 o[NV];
    for (int64_t c = 0; c < NV; ++c) o[c] = s[n] * Load(vs + kLanes * c);
    for (int64_t j = 0, t = 0; t < n; ++j) {
      const float* vp = a.v_layer + pages[j] * S * row + h * K;
      for (int64_t u = 0, cnt = std::min(S, n - t); u < cnt; ++u, ++t)
        for (int64_t c = 0; c < NV; ++c) o[c] += s[t] * Load(vp + u * row + kLanes * c);
    }
    float* og = a.out + ((b * a.KVH + h) * a.G + g) * K;
    for (int64_t c = 0; c < NV; ++c) Store(og + kLanes * c, o[c] * inv);
  }
}

// Any head_dim: the same computation in scalar loops.
void AttendScalar(const Args& a, int64_t b, int64_t h, std::vector<float>& s) {
  const int64_t S = a.S, K = a.K, row = a.KVH * K;
  const int64_t n = CachedTokens(a, b);
  s.resize(n + 1);
  const int32_t* pages = a.page_table + b * a.W;
  auto krow = [&](int64_t t) {
    return t < n ? a.k_layer + (pages[t / S] * S + t % S) * row + h * K
                 : a.k_self + (b * a.KVH + h) * K;
  };
  auto vrow = [&](int64_t t) {
    return t < n ? a.v_layer + (pages[t / S] * S + t % S) * row + h * K
                 : a.v_self + (b * a.KVH + h) * K;
  };
  for (int64_t g = 0; g < a.G; ++g) {
    const float* qg = a.q + ((b * a.KVH + h) * a.G + g) * K;
    float m = -1e30f;
    for (int64_t t = 0; t <= n; ++t) {
      const float* kt = krow(t);
      float acc = 0.f;
      for (int64_t i = 0; i < K; ++i) acc += qg[i] * kt[i];
      s[t] = acc * a.scale;
      m = std::max(m, s[t]);
    }
    float total = 0.f;
    for (int64_t t = 0; t <= n; ++t) total += (s[t] = std::exp(s[t] - m));
    float* og = a.out + ((b * a.KVH + h) * a.G + g) * K;
    std::fill(og, og + K, 0.f);
    for (int64_t t = 0; t <= n; ++t) {
      const float* vt = vrow(t);
      const float p = s[t] / total;
      for (int64_t i = 0; i < K; ++i) og[i] += p * vt[i];
    }
  }
}

void AttendTask(const Args& a, int64_t task, std::vector<float>& s) {
  const int64_t b = task / a.KVH, h = task % a.KVH;
  switch (a.K) {
    case 16: return AttendVectorized<16>(a, b, h, s);
    case 32: return AttendVectorized<32>(a, b, h, s);
    case 64: return AttendVectorized<64>(a, b, h, s);
    case 128: return AttendVectorized<128>(a, b, h, s);
    case 256: return AttendVectorized<256>(a, b, h, s);
    default: return AttendScalar(a, b, h, s);
  }
}

ffi::Error PagedAttentionCpu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                             ffi::Buffer<ffi::F32> k_self, ffi::Buffer<ffi::F32> v_self,
                             ffi::Buffer<ffi::F32> k_pool, ffi::Buffer<ffi::F32> v_pool,
                             ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_table,
                             ffi::Buffer<ffi::S32> positions, float scale,
                             ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto pd = k_pool.dimensions();
  const auto td = page_table.dimensions();
  if (qd.size() != 4 || pd.size() != 5 || td.size() != 2 || positions.dimensions().size() != 1)
    return ffi::Error::InvalidArgument(
        "paged_attention_cpu: expected q [B,KVH,G,K], pools [L,P,S,KVH,K], page_table [B,W], "
        "positions [B]");
  const int64_t B = qd[0], KVH = qd[1], G = qd[2], K = qd[3];
  const int64_t L = pd[0], P = pd[1], S = pd[2], W = td[1];
  const auto vd = v_pool.dimensions();
  if (pd[3] != KVH || pd[4] != K || td[0] != B || positions.dimensions()[0] != B ||
      vd.size() != 5 || !std::equal(vd.begin(), vd.end(), pd.begin()))
    return ffi::Error::InvalidArgument("paged_attention_cpu: operand shapes disagree");
  const int32_t l = layer.typed_data()[0];
  if (l < 0 || l >= L)
    return ffi::Error::InvalidArgument("paged_attention_cpu: layer index out of range");
  const int32_t* pt = page_table.typed_data();
  for (int64_t i = 0; i < B * W; ++i)
    if (pt[i] < 0 || pt[i] >= P)
      return ffi::Error::InvalidArgument("paged_attention_cpu: page id out of range");
  const int64_t layer_size = P * S * KVH * K;
  const Args args{q.typed_data(),        k_self.typed_data(),
                  v_self.typed_data(),   k_pool.typed_data() + l * layer_size,
                  v_pool.typed_data() + l * layer_size, pt,
                  positions.typed_data(), W, S, KVH, G, K, scale, out->typed_data()};
  // Scratch per thread: tasks run on XLA's pool threads as well as the caller.
  ares_cpu::ParallelFor(pool, B * KVH, [args](int64_t task) {
    thread_local std::vector<float> scratch;
    AttendTask(args, task, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AresPagedAttentionCpu, PagedAttentionCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_self
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_self
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_pool
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_pool
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
