// kronjax native kernels: a parallel loop on XLA's intra-op thread pool.
//
// The kernels run inside an XLA CPU executable, so they borrow its thread pool
// (ffi::ThreadPool) instead of starting threads of their own. The caller takes
// chunks too, so the loop finishes even when no pool thread is free (or there is
// no pool: Schedule then runs the task inline). A helper task that starts after
// the loop is done finds no chunk left and touches only the shared counters.

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

// Calls fn(begin, end) over [0, count) in chunks of at least `grain` units, on up
// to pool.num_threads() threads (the caller included). Returns when all are done.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, int64_t grain, const F& fn) {
  if (count <= 0) return;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t tasks = std::min(threads, count / std::max<int64_t>(grain, 1));
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
  // A few chunks per thread: a thread that started late still gets a share.
  const int64_t size = (count + tasks * 4 - 1) / (tasks * 4);
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
