// Vector and threading primitives of the fused CPU attention kernel (cpu_attention.cc).
//
// The vectors are GCC vector extensions of 16 floats, which lower to whatever the machine's
// -march offers (one AVX-512 register, two AVX2 registers, four NEON registers).

#ifndef TX_KERNELS_CPU_SIMD_H_
#define TX_KERNELS_CPU_SIMD_H_

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace tx_cpu {

namespace ffi = xla::ffi;

constexpr int kLanes = 16;
typedef float v16 __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t i16 __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline v16 splat(float x) { return v16{} + x; }
inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline i16 iota() { return i16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

// max(x[j0:j1]), j0 < j1: whole vectors, then the tail.
inline float max_of(const float* x, int64_t j0, int64_t j1) {
  float m = x[j0];
  int64_t j = j0;
  if (j1 - j0 >= kLanes) {
    v16 acc = load(x + j0);
    for (j = j0 + kLanes; j + kLanes <= j1; j += kLanes) {
      v16 v = load(x + j);
      acc = v > acc ? v : acc;
    }
    for (int l = 0; l < kLanes; ++l) m = acc[l] > m ? acc[l] : m;
  }
  for (; j < j1; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// e^x for x <= 0 (arguments below -87 give ~1e-38, not 0: callers zero masked lanes).
// x = n ln2 + r with |r| <= ln2 / 2, ln2 split in two (hi has 16 bits, so n * hi is exact);
// e^r by its Taylor series to r^7 / 7!, whose remainder (< 5e-9 relative) is below fp32's
// rounding; 2^n is built in the exponent bits.
inline v16 exp_neg(v16 x) {
  constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.4286068202862268e-06f;
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  // n = floor(x / ln2 + 0.5): the conversion truncates, so step down where it rounded up.
  v16 y = x * splat(1.44269504088896341f) + splat(0.5f);
  v16 n = __builtin_convertvector(__builtin_convertvector(y, i16), v16);
  n = n > y ? n - splat(1.0f) : n;
  v16 r = x - n * splat(kLn2Hi) - n * splat(kLn2Lo);
  v16 p = splat(1.0f / 5040.0f);
  p = p * r + splat(1.0f / 720.0f);
  p = p * r + splat(1.0f / 120.0f);
  p = p * r + splat(1.0f / 24.0f);
  p = p * r + splat(1.0f / 6.0f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
  v16 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// Runs body(item) for item in [0, items) on the caller and the pool's threads. The caller
// waits only for items other threads have claimed, never for a task to start: a pool busy
// with other work (or with another call like this one) cannot deadlock it. Late tasks find
// nothing left and touch only the shared counters.
struct Progress {
  std::atomic<int64_t> next{0}, completed{0};
};

// Below this many multiply-adds (about 10 us of one core) a call runs on the caller alone:
// waking a pool thread costs about what it would take over. A batch-1 decode step's
// attention is under it; a batch-8 step's is over (bench_vs_hf --work=decode: one thread
// lifts batch 1 paged decode ~10%, and costs batch 8 ~15%).
constexpr int64_t kParallelWork = int64_t{1} << 18;

template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t items, int64_t work, const F& body) {
  auto progress = std::make_shared<Progress>();
  auto run = [progress, items, &body] {
    for (int64_t item; (item = progress->next.fetch_add(1)) < items;) {
      body(item);
      progress->completed.fetch_add(1);
    }
  };
  int64_t helpers = work < kParallelWork ? 0 : std::min<int64_t>(pool.num_threads(), items - 1);
  for (int64_t w = 0; w < helpers; ++w) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  while (progress->completed.load() < items) std::this_thread::yield();
}

}  // namespace tx_cpu

#endif  // TX_KERNELS_CPU_SIMD_H_
