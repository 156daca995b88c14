// Shared by the XLA:CPU kernels: a portable 16-float vector type and a work splitter over
// XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ares_cpu {

// GCC/Clang vector extensions, no intrinsics: one AVX-512 register, two AVX2 registers or four
// NEON registers.
typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t kLanes = 16;

inline v16 Load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void Store(float* p, v16 x) { *reinterpret_cast<v16*>(p) = x; }
inline v16 Splat(float x) { return v16{} + x; }

// Runs task(i) for i in [0, tasks) on the caller plus up to num_threads - 1 pool threads. Tasks
// are claimed from a shared counter, so the caller finishes the work alone if the pool is busy;
// a helper that starts late finds nothing left and only touches the shared counters. `task`
// is copied into every helper.
template <typename Task>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t tasks, Task task) {
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < tasks; ++i) task(i);
    return;
  }
  auto progress = std::make_shared<Progress>();
  auto drain = [progress, task, tasks]() mutable {
    for (int64_t i; (i = progress->next.fetch_add(1)) < tasks;) {
      task(i);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([drain]() mutable { drain(); });
  drain();
  // A helper that claimed a task may have been descheduled: give it the core.
  while (progress->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

}  // namespace ares_cpu
