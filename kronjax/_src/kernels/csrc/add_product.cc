// kronjax native CPU kernel: X + G @ R accumulated in place by BLAS gemm (beta = 1).
//
// Why: on XLA CPU the step's one O(m n) operation, P + G @ R, runs as a product
// into a temporary and then a separate, single-threaded add pass over P. A BLAS
// gemm with beta = 1 reads and writes P once (kronjax/native.py has the numbers).
//
// Shapes (row-major, as XLA hands them over): X (..., r, c), G (..., r, k),
// R (..., k, c), result (..., r, c), aliased to X. Every leading dimension of G
// and R is either X's or 1 (broadcast), so a sweep's shared Gram rows are not
// copied per member. BLAS is column-major: row-major C += G R is column-major
// C^T += R^T G^T, one gemm("N", "N", c, r, k) per leading index.
// kronjax_add_product_t takes G transposed, Gt (..., k, r), for X + Gt^T @ R:
// gemm("N", "T", ...), so the caller never copies a transpose.
//
// When G is mostly zeros (the dense path's coefficients are zero for every neuron
// that is off at a batch point) the kernel skips them instead: per row of X, one
// axpy per nonzero of G's row, so the work is nnz(G) * c, not r * k * c. Exact:
// the skipped terms are 0 * R[b, :], which is zero for finite R (the Gram rows).
//
// Threads: the work is cut into pieces of X along its longer side (the operand
// that every piece packs again is then the short one) and the pieces are taken
// one at a time by XLA's intra-op threads (parallel.h), each running a
// single-threaded gemm. BLAS's own threads split one gemm into static parts that
// wait for each other spinning: beside one busy process on two cores a step took
// 16-32 ms instead of 1.5 ms, and the spinning threads competed with XLA's pool
// for the same cores. So while a kernel runs BLAS is set to one thread
// (SerialBlas); where its thread count cannot be set, each member runs as one
// gemm left to BLAS's threads, as before.
//
// The gemm entry points are scipy's (scipy.linalg.cython_blas, LP64 Fortran
// ABI), handed over once by kronjax_set_blas with the thread-count functions of
// the BLAS behind them: no link-time BLAS dependency.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using kronjax::ParallelFor;

template <typename T>
using GemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const T*,
                        const T*, const int*, const T*, const int*, const T*, T*, const int*);

GemmFn<float> sgemm = nullptr;
GemmFn<double> dgemm = nullptr;

// The BLAS library's thread count: openblas_set_num_threads / _get_num_threads
// (scipy's build prefixes them scipy_); null where the BLAS has none.
using SetThreadsFn = void (*)(int);
using GetThreadsFn = int (*)();
SetThreadsFn blas_set_threads = nullptr;
GetThreadsFn blas_get_threads = nullptr;

// BLAS runs single-threaded while at least one SerialBlas lives; the last one
// gone gives it back the thread count it had. The count is the library's global
// setting: another thread's BLAS call that starts meanwhile (scipy.linalg beside
// a training step) runs single-threaded too, and is as exact.
class SerialBlas {
 public:
  SerialBlas() {
    std::lock_guard<std::mutex> lock(mu_);
    if (users_++ == 0) {
      saved_ = blas_get_threads();
      if (saved_ != 1) blas_set_threads(1);
    }
  }
  ~SerialBlas() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--users_ == 0 && saved_ != 1) blas_set_threads(saved_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

  // Whether the kernels split gemm themselves: the BLAS's thread count can be set,
  // and kronjax_set_blas_split has not turned it off.
  static bool Possible() {
    return blas_set_threads != nullptr && blas_get_threads != nullptr &&
           enabled.load(std::memory_order_relaxed);
  }
  static inline std::atomic<bool> enabled{true};

 private:
  static inline std::mutex mu_;
  static inline int64_t users_ = 0;
  static inline int saved_ = 1;
};

template <typename T> GemmFn<T> gemm();
template <> GemmFn<float> gemm<float>() { return sgemm; }
template <> GemmFn<double> gemm<double>() { return dgemm; }

// Offset (in matrices) of operand `dims`'s matrix for X's leading index `flat`.
int64_t BroadcastOffset(int64_t flat, ffi::Span<const int64_t> x_dims,
                        ffi::Span<const int64_t> dims) {
  const size_t lead = x_dims.size() - 2;
  int64_t offset = 0, stride = 1;
  for (size_t i = lead; i-- > 0;) {
    const int64_t coord = flat % x_dims[i];
    flat /= x_dims[i];
    if (dims[i] != 1) offset += coord * stride;
    stride *= dims[i];
  }
  return offset;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define KRONJAX_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define KRONJAX_CLONES
#endif

// One member, G mostly zero: x (r, c) += g (r, k) @ rr (k, c), skipping g's zeros.
// g's entry (j, b) is g[j * g_row + b * g_col] (row-major: g_row = k, g_col = 1).
template <typename T>
KRONJAX_CLONES void AddSparseProduct(T* __restrict__ x, const T* __restrict__ g,
                                     const T* __restrict__ rr, int64_t rows, int64_t cols,
                                     int64_t k, int64_t g_row, int64_t g_col) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t j = 0; j < rows; ++j) {
    T* __restrict__ xj = x + j * cols;
    // Rows are short streams (2 KiB at c = 512) with gaps where G's row is all
    // zero; the hardware prefetcher does not keep up. Fetching two rows ahead
    // took a 16-member (32 MiB) pass from 0.64 to 0.36 ms per member.
    if (j + 2 < rows)
      for (int64_t i = 0; i < cols; i += kLine) __builtin_prefetch(x + (j + 2) * cols + i, 1, 3);
    for (int64_t b = 0; b < k; ++b) {
      const T gjb = g[j * g_row + b * g_col];
      if (gjb == T(0)) continue;
      const T* __restrict__ rb = rr + b * cols;
      for (int64_t i = 0; i < cols; ++i) xj[i] += gjb * rb[i];
    }
  }
}

// Below this fraction of nonzeros in G the zero-skipping loop beats gemm (measured
// at r = 1024, k = 32, c = 512 on an AVX2 CPU: 0.16-0.2 ms at 6 % nonzeros, gemm
// 0.3-0.5 ms; the loop's rate per nonzero is about a fifth of gemm's per entry).
constexpr int64_t kSparseInverseDensity = 10;

// Whether fewer than 1 / kSparseInverseDensity of g's entries are nonzero. Stops
// as soon as the answer is no, so a dense G (the point-major P's Gram rows)
// costs a tenth of a scan per member, not a whole one.
template <typename T>
bool MostlyZero(const T* g, int64_t size) {
  const int64_t limit = size / kSparseInverseDensity;
  int64_t nnz = 0;
  for (int64_t i = 0; i < size; ++i)
    if (g[i] != T(0) && ++nnz > limit) return false;
  return nnz * kSparseInverseDensity < size;
}

// Lines of X per unit of work: 16 floats (64 bytes) or 16 doubles.
constexpr int64_t kBlock = 16;
// Below this many multiply-adds a chunk is not worth handing to another thread.
constexpr int64_t kGrainMacs = int64_t{1} << 19;

// One call's operands, member by member: X's rows or columns [lo, hi) of
// member s, by the zero-skipping loop or a single gemm.
template <typename T>
struct Operands {
  T* o;                  // X (batch, rows, cols), in place
  const T* const* g;     // per member: G (rows, k), or Gt (k, rows) when transposed
  const T* const* r;     // per member: R (k, cols)
  const char* sparse;    // per member: G mostly zero
  int64_t rows, cols, k;
  bool transposed;
  // The trace form (TraceProduct), else null: Y (batch, rows, cols) in place, and per
  // member three scalars (mu, nu, c): X = mu X + nu Y before the product, Y += c X after.
  T* y = nullptr;
  const T* const* coef = nullptr;

  // Whether member s is split by rows of X (else by columns): the longer side; always rows
  // in the trace form, whose elementwise passes want contiguous pieces.
  bool ByRows(int64_t s) const { return sparse[s] || y != nullptr || rows >= cols; }
  int64_t Lines(int64_t s) const { return ByRows(s) ? rows : cols; }

  // f(x_row, y_row, n) over the piece [lo, hi) of member s: rows, or a block of columns.
  template <typename F>
  void EachRun(int64_t s, int64_t lo, int64_t hi, F f) const {
    T* x = o + s * rows * cols;
    T* ys = y + s * rows * cols;
    if (ByRows(s)) {
      f(x + lo * cols, ys + lo * cols, (hi - lo) * cols);
    } else {
      for (int64_t j = 0; j < rows; ++j) f(x + j * cols + lo, ys + j * cols + lo, hi - lo);
    }
  }

  void Run(int64_t s, int64_t lo, int64_t hi) const {
    if (hi <= lo) return;
    if (y == nullptr) return Product(s, lo, hi);
    const T mu = coef[s][0], nu = coef[s][1], c = coef[s][2];
    // Each piece is scaled, multiplied into and read back while it is in cache: X and Y
    // cross memory once (a sweep of separate passes crossed it three times).
    EachRun(s, lo, hi, [&](T* __restrict__ xs, const T* __restrict__ ys, int64_t n) {
      if (nu != T(0)) {
        for (int64_t i = 0; i < n; ++i) xs[i] = mu * xs[i] + nu * ys[i];
      } else if (mu != T(1)) {
        for (int64_t i = 0; i < n; ++i) xs[i] = mu * xs[i];
      }
    });
    Product(s, lo, hi);
    if (c == T(0)) return;
    EachRun(s, lo, hi, [&](const T* __restrict__ xs, T* __restrict__ ys, int64_t n) {
      for (int64_t i = 0; i < n; ++i) ys[i] += c * xs[i];
    });
  }

  void Product(int64_t s, int64_t lo, int64_t hi) const {
    T* x = o + s * rows * cols;
    const T *gs = g[s], *rs = r[s];
    // G's entry (j, b): gs[j * g_row + b * g_col].
    const int64_t g_row = transposed ? 1 : k, g_col = transposed ? rows : 1;
    if (sparse[s]) {
      AddSparseProduct(x + lo * cols, gs + lo * g_row, rs, hi - lo, cols, k, g_row, g_col);
      return;
    }
    // Column-major: C (cols, rows) += A (cols, k) B (k, rows), A = R, B = G^T.
    const int K = static_cast<int>(k), ldc = static_cast<int>(cols);
    const int ldb = static_cast<int>(transposed ? rows : k);
    const char* tb = transposed ? "T" : "N";
    const T one = 1;
    if (ByRows(s)) {
      const int M = static_cast<int>(cols), N = static_cast<int>(hi - lo);
      gemm<T>()("N", tb, &M, &N, &K, &one, rs, &ldc, gs + lo * g_row, &ldb, &one, x + lo * cols, &ldc);
    } else {
      const int M = static_cast<int>(hi - lo), N = static_cast<int>(rows);
      gemm<T>()("N", tb, &M, &N, &K, &one, rs + lo, &ldc, gs, &ldb, &one, x + lo, &ldc);
    }
  }
};

// kTransposedG: G arrives as its transpose, (..., k, r) row-major, and the
// product is X + G^T @ R (the point-major P's Gram rows, K[S, :] (B, n), need no
// transposed copy: BLAS reads them transposed).
template <ffi::DataType DT, bool kTransposedG>
ffi::Error AddProductCore(ffi::ThreadPool pool, ffi::Buffer<DT> x_buf, ffi::Buffer<DT> g,
                          ffi::Buffer<DT> r, ffi::Result<ffi::Buffer<DT>> out,
                          const ffi::Buffer<DT>* y_buf, const ffi::Buffer<DT>* coef_buf,
                          ffi::Result<ffi::Buffer<DT>>* y_out) {
  using T = ffi::NativeType<DT>;
  const GemmFn<T> fn = gemm<T>();
  if (fn == nullptr) return ffi::Error::Internal("kronjax add_product: BLAS gemm was never set");
  const auto xd = x_buf.dimensions(), gd = g.dimensions(), rd = r.dimensions();
  const size_t rank = xd.size();
  if (rank < 2 || gd.size() != rank || rd.size() != rank)
    return ffi::Error::InvalidArgument("kronjax add_product: X, G and R need one rank >= 2");
  const int64_t rows = xd[rank - 2], cols = xd[rank - 1];
  const int64_t k = gd[rank - (kTransposedG ? 2 : 1)], g_rows = gd[rank - (kTransposedG ? 1 : 2)];
  if (g_rows != rows || rd[rank - 2] != k || rd[rank - 1] != cols)
    return ffi::Error::InvalidArgument("kronjax add_product: shapes do not chain");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if ((gd[i] != 1 && gd[i] != xd[i]) || (rd[i] != 1 && rd[i] != xd[i]))
      return ffi::Error::InvalidArgument("kronjax add_product: leading dimensions must match X's or be 1");
    batch *= xd[i];
  }
  const int64_t big = std::numeric_limits<int>::max();
  if (rows > big || cols > big || k > big)
    return ffi::Error::InvalidArgument("kronjax add_product: a dimension exceeds the BLAS int range");

  std::vector<const T*> coefs(batch);
  T* y = nullptr;
  if (y_buf != nullptr) {
    const auto yd = y_buf->dimensions(), cd = coef_buf->dimensions();
    if (yd.size() != rank || cd.size() != rank - 1 || cd[rank - 2] != 3)
      return ffi::Error::InvalidArgument("kronjax trace_product: Y must be X's shape, coef (..., 3)");
    for (size_t i = 0; i < rank; ++i)
      if (yd[i] != xd[i]) return ffi::Error::InvalidArgument("kronjax trace_product: Y must be X's shape");
    for (size_t i = 0; i + 2 < rank; ++i)
      if (cd[i] != 1 && cd[i] != xd[i])
        return ffi::Error::InvalidArgument("kronjax trace_product: coef's leading dimensions must match X's or be 1");
    std::vector<int64_t> lead(cd.begin(), cd.end());
    lead.push_back(1);  // coef (..., 3) read as (..., 3, 1) for BroadcastOffset
    for (int64_t s = 0; s < batch; ++s)
      coefs[s] = coef_buf->typed_data() + BroadcastOffset(s, xd, lead) * 3;
    y = (*y_out)->typed_data();
    if (y != y_buf->typed_data()) std::memcpy(y, y_buf->typed_data(), sizeof(T) * batch * rows * cols);
  }
  const T* x = x_buf.typed_data();
  T* o = out->typed_data();
  if (o != x) std::memcpy(o, x, sizeof(T) * batch * rows * cols);  // XLA could not alias
  if (rows == 0 || cols == 0) return ffi::Error::Success();
  if (k == 0 && y == nullptr) return ffi::Error::Success();

  std::vector<const T*> gs(batch), rs(batch);
  std::vector<char> sparse(batch);
  for (int64_t s = 0; s < batch; ++s) {
    gs[s] = g.typed_data() + BroadcastOffset(s, xd, gd) * rows * k;
    rs[s] = r.typed_data() + BroadcastOffset(s, xd, rd) * k * cols;
    sparse[s] = MostlyZero(gs[s], rows * k);
  }
  Operands<T> ops{o, gs.data(), rs.data(), sparse.data(), rows, cols, k, kTransposedG};
  ops.y = y;
  ops.coef = coefs.data();
  if (!SerialBlas::Possible()) {  // BLAS threads each gemm itself: one call per member
    for (int64_t s = 0; s < batch; ++s) ops.Run(s, 0, ops.Lines(s));
    return ffi::Error::Success();
  }
  SerialBlas serial;
  // Units: blocks of kBlock lines of X along its longer side (rows, for a sparse
  // member: its loop runs by row), member after member. A block of columns is a
  // whole number of cache lines, so no two threads write into one line.
  std::vector<int64_t> first(batch + 1, 0);  // first[s]: member s's first unit
  for (int64_t s = 0; s < batch; ++s)
    first[s + 1] = first[s] + (ops.Lines(s) + kBlock - 1) / kBlock;
  // At least kGrainMacs multiply-adds per chunk (a block's work, rows of the
  // other side times k, as if dense): below that one thread does it all.
  const int64_t block_macs = kBlock * std::min(rows, cols) * k;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(block_macs, 1));
  ParallelFor(pool, first[batch], grain, [&](int64_t lo, int64_t hi) {
    for (int64_t s = std::upper_bound(first.begin(), first.end(), lo) - first.begin() - 1;
         s < batch && first[s] < hi; ++s) {
      const int64_t a = std::max(lo, first[s]) - first[s], b = std::min(hi, first[s + 1]) - first[s];
      ops.Run(s, a * kBlock, std::min(b * kBlock, ops.Lines(s)));
    }
  });
  return ffi::Error::Success();
}

template <ffi::DataType DT, bool kTransposedG>
ffi::Error AddProduct(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> g, ffi::Buffer<DT> r,
                      ffi::Result<ffi::Buffer<DT>> out) {
  return AddProductCore<DT, kTransposedG>(pool, x, g, r, out, nullptr, nullptr, nullptr);
}

// The trace form: X = mu X + nu Y; X += G @ R (or G^T @ R); Y += c X, piece by piece.
// X is a momentum trace, Y its array (P), coef (..., 3) the step's (mu, nu, c).
template <ffi::DataType DT, bool kTransposedG>
ffi::Error TraceProduct(ffi::ThreadPool pool, ffi::Buffer<DT> x, ffi::Buffer<DT> y,
                        ffi::Buffer<DT> g, ffi::Buffer<DT> r, ffi::Buffer<DT> coef,
                        ffi::Result<ffi::Buffer<DT>> x_out, ffi::Result<ffi::Buffer<DT>> y_out) {
  return AddProductCore<DT, kTransposedG>(pool, x, g, r, x_out, &y, &coef, &y_out);
}

}  // namespace

// The gemm entry points, and the BLAS library's thread-count setter and getter
// (both null where it has none: each gemm then threads itself).
extern "C" void kronjax_set_blas(void* sgemm_fn, void* dgemm_fn, void* set_threads_fn,
                                 void* get_threads_fn) {
  sgemm = reinterpret_cast<GemmFn<float>>(sgemm_fn);
  dgemm = reinterpret_cast<GemmFn<double>>(dgemm_fn);
  const bool both = set_threads_fn != nullptr && get_threads_fn != nullptr;
  blas_set_threads = both ? reinterpret_cast<SetThreadsFn>(set_threads_fn) : nullptr;
  blas_get_threads = both ? reinterpret_cast<GetThreadsFn>(get_threads_fn) : nullptr;
}

// The most threads the kernels' loops use (0: XLA's pool size); returns the previous value.
extern "C" int kronjax_set_max_threads(int threads) {
  return kronjax::max_threads.exchange(threads < 0 ? 0 : threads);
}

// Whether the kernels split gemm over XLA's threads (BLAS's thread count can be set).
extern "C" int kronjax_blas_split() { return SerialBlas::Possible() ? 1 : 0; }

// Turns the split off (0: each member's gemm is one call that BLAS threads itself,
// for benchmarks) or back on; returns the previous setting.
extern "C" int kronjax_set_blas_split(int enable) {
  return SerialBlas::enabled.exchange(enable != 0) ? 1 : 0;
}

// One handler per dtype and G layout: the thread pool, X, G, R in, the result
// (aliased to X) out.
#define KRONJAX_ADD_PRODUCT_HANDLER(name, DT, transposed)                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (AddProduct<DT, transposed>),           \
                                ffi::Ffi::Bind()                              \
                                    .Ctx<ffi::ThreadPool>()                   \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Ret<ffi::Buffer<DT>>());

KRONJAX_ADD_PRODUCT_HANDLER(kronjax_add_product_f32, ffi::DataType::F32, false)
KRONJAX_ADD_PRODUCT_HANDLER(kronjax_add_product_f64, ffi::DataType::F64, false)
KRONJAX_ADD_PRODUCT_HANDLER(kronjax_add_product_t_f32, ffi::DataType::F32, true)
KRONJAX_ADD_PRODUCT_HANDLER(kronjax_add_product_t_f64, ffi::DataType::F64, true)

// The trace form: the thread pool, X (the trace), Y (the array), G, R, coef in; X and Y
// (aliased) out.
#define KRONJAX_TRACE_PRODUCT_HANDLER(name, DT, transposed)                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (TraceProduct<DT, transposed>),         \
                                ffi::Ffi::Bind()                              \
                                    .Ctx<ffi::ThreadPool>()                   \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Ret<ffi::Buffer<DT>>()                   \
                                    .Ret<ffi::Buffer<DT>>());

KRONJAX_TRACE_PRODUCT_HANDLER(kronjax_trace_product_f32, ffi::DataType::F32, false)
KRONJAX_TRACE_PRODUCT_HANDLER(kronjax_trace_product_f64, ffi::DataType::F64, false)
KRONJAX_TRACE_PRODUCT_HANDLER(kronjax_trace_product_t_f32, ffi::DataType::F32, true)
KRONJAX_TRACE_PRODUCT_HANDLER(kronjax_trace_product_t_f64, ffi::DataType::F64, true)
