// parallel_for over XLA's intra-op thread pool for the CPU kernels, deadlock-free.
//
// Tasks 0..n-1 are claimed from an atomic counter by the calling thread and by one helper
// scheduled on the pool (these machines have 2 cores). A helper that has not started by the time
// the caller ran out of tasks is cancelled, so the caller never waits on a queued task (the pool
// may be busy, have one thread, or run the task inline).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace specdec {

template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, int64_t threads, const Fn& fn) {
  enum : int { kOpen = 0, kRunning = 1, kCancelled = 2, kDone = 3 };
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int> state{kOpen};
  };
  auto drain = [n, &fn](Shared& s) {
    for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(i);
  };
  auto s = std::make_shared<Shared>();
  if (threads <= 1 || n <= 1) {
    drain(*s);
    return;
  }
  // The helper only touches `fn` while state is kRunning, and the caller waits for kDone before
  // returning, so capturing `fn` by reference is safe; `s` outlives a cancelled helper.
  const Fn* f = &fn;
  pool.Schedule([s, f, n] {
    int open = kOpen;
    if (!s->state.compare_exchange_strong(open, kRunning)) return;
    for (int64_t i; (i = s->next.fetch_add(1, std::memory_order_relaxed)) < n;) (*f)(i);
    s->state.store(kDone, std::memory_order_release);
  });
  drain(*s);
  int open = kOpen;
  if (!s->state.compare_exchange_strong(open, kCancelled))
    while (s->state.load(std::memory_order_acquire) != kDone) _mm_pause();
}

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };  // as specdec.kernels.ISA_NAMES

// The widest ISA this CPU runs.
inline Isa best_isa() {
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kScalar;
}

// The ISA a kernel runs: the widest here, capped by the call's `isa` attribute when >= 0.
inline Isa run_isa(int64_t cap) {
  return cap >= 0 ? static_cast<Isa>(std::min<int64_t>(best_isa(), cap)) : best_isa();
}

}  // namespace specdec
