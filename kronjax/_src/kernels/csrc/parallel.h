// kronjax native kernels: a parallel loop on XLA's intra-op thread pool.
//
// The kernels run inside an XLA CPU executable, so they borrow its thread pool
// (ffi::ThreadPool) instead of starting threads of their own: one pool for XLA's
// ops and the kernels, none oversubscribed. The work is cut into chunks taken
// one at a time from a shared counter, and the caller takes chunks too, so a
// thread that another process has taken the core from holds up at most the one
// chunk it is on: the others finish the rest (static halves waited for the
// slower half). The loop finishes even when no pool thread is free (or there is
// no pool: Schedule then runs the task inline). A helper task that starts after
// the loop is done finds no chunk left and touches only the shared counters.
// The caller waits on a condition variable, not spinning, so a core it would
// spin on goes to the helper or to another process.

#ifndef KRONJAX_CSRC_PARALLEL_H_
#define KRONJAX_CSRC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace kronjax {

// The most threads a loop may use (the caller included); 0: the pool's size.
// Set by kronjax_set_max_threads (native.set_max_threads), for benchmarks that
// compare thread counts in one process.
inline std::atomic<int> max_threads{0};

// Chunks per thread: a thread that started late, or lost its core for a while,
// still finds a share, and the one chunk a descheduled thread holds is small.
constexpr int64_t kChunksPerThread = 8;

// The threads a loop on `pool` uses: the pool's size (or max_threads, if smaller).
inline int64_t LoopThreads(xla::ffi::ThreadPool& pool) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t cap = max_threads.load(std::memory_order_relaxed);
  return cap > 0 ? std::min(threads, cap) : threads;
}

// Calls fn(begin, end) over [0, count) in chunks of at least `grain` units, on up
// to LoopThreads(pool) threads (the caller included). Returns when all are done.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, int64_t grain, const F& fn) {
  if (count <= 0) return;
  const int64_t tasks = std::min(LoopThreads(pool), count / std::max<int64_t>(grain, 1));
  if (tasks <= 1) {
    fn(int64_t{0}, count);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  const int64_t size =
      std::max(std::max<int64_t>(grain, 1), (count + tasks * kChunksPerThread - 1) / (tasks * kChunksPerThread));
  const int64_t chunks = (count + size - 1) / size;
  const F* body = &fn;  // only dereferenced while a chunk is open, i.e. before we return
  auto work = [shared, body, chunks, size, count]() {
    for (int64_t c; (c = shared->next.fetch_add(1)) < chunks;) {
      (*body)(c * size, std::min(count, (c + 1) * size));
      std::lock_guard<std::mutex> lock(shared->mu);
      if (++shared->done == chunks) shared->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < tasks; ++t) {
    auto task = work;  // Schedule takes ownership of a copy
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done == chunks; });
}

}  // namespace kronjax

#endif  // KRONJAX_CSRC_PARALLEL_H_
