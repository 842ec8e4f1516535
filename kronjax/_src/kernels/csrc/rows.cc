// kronjax native CPU kernels: the dense step's work on the batch's rows of P and A_T.
//
// Why: a sweep's members share the batch, so the step's small operands are the
// rows X[s, idx[i], :] of every member s: (S, B, m), 2 MiB at S = 16, B = 32,
// m = 1024, which no longer fits in a core's L2. XLA CPU canonicalizes that
// gather to an index-major (B, S, m) result and transposes it again for every
// consumer, materializes the ReLU and its mask in separate passes, and its
// scatter-add computes an index per element: in the 16-member sweep these took
// about 2.7 ms of a 7.5 ms step (jax.profiler), the product itself 4.7 ms.
// Here each kernel reads a batch row once, while it is in L1, and the members'
// rows are split over XLA's intra-op threads (parallel.h).
//
// Shapes (row-major): X (..., n, m), idx (B,) int32; every other operand has
// X's leading dimensions "...". Index semantics are jax.numpy's: a negative
// index counts from the end; a read clamps into [0, n) (as X[idx] does), a
// write drops an index out of range (as X.at[idx].add does); repeated indices
// accumulate in index order.
//
//   take_rows(X, idx) -> (..., B, m)                     X[..., idx, :]
//   take_cols(P (..., m, n), idx) -> (..., B, m)         swapaxes(P[..., :, idx], -1, -2)
//   add_rows(X, idx, U (..., B, m)) -> X, in place        X.at[..., idx, :].add(U)
//   relu_rows(X, idx, b (...), a (..., m, C))
//       -> out (..., B, C), count (..., B)               h = relu(X[idx] - b):
//                                                        out = h @ a, count = #(X[idx] > b)
//   relu_rows_grad(X, idx, b, a, g (..., B, C)) -> (..., B, m)
//                                                        where(X[idx] > b, g @ a^T, 0)
//
// With several outputs (C > 1) relu_rows skips the terms where h == 0 (most of
// them: the threshold makes the layer sparse), which is exact for finite a. A
// NaN in X propagates to out, as relu(NaN) does.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using kronjax::ParallelFor;

// Below this many row elements per thread, splitting costs more than it saves.
constexpr int64_t kGrainElements = 1 << 15;

// jax.numpy's index normalization: idx < 0 counts from the end.
inline int64_t Normalize(int32_t idx, int64_t n) { return idx < 0 ? idx + n : idx; }

inline int64_t Clamp(int64_t j, int64_t n) { return j < 0 ? 0 : (j >= n ? n - 1 : j); }

// X as a stack: leading size (product of all but the last two dims), rows, columns.
struct Stack {
  int64_t lead = 1, rows = 0, cols = 0;
};

// Offset of the row read for unit u = (member u / B, batch point u % B), clamped.
inline int64_t RowOffset(int64_t u, int64_t B, const int32_t* idx, const Stack& x) {
  return ((u / B) * x.rows + Clamp(Normalize(idx[u % B], x.rows), x.rows)) * x.cols;
}

bool AsStack(ffi::Span<const int64_t> dims, Stack* stack) {
  if (dims.size() < 2) return false;
  for (size_t i = 0; i + 2 < dims.size(); ++i) stack->lead *= dims[i];
  stack->rows = dims[dims.size() - 2];
  stack->cols = dims[dims.size() - 1];
  return true;
}

// Whether `dims` is X's leading dimensions followed by `tail` (rank - 2 + tail.size()).
bool Leading(ffi::Span<const int64_t> x, ffi::Span<const int64_t> dims,
             std::initializer_list<int64_t> tail) {
  const size_t lead = x.size() - 2;
  if (dims.size() != lead + tail.size()) return false;
  for (size_t i = 0; i < lead; ++i)
    if (dims[i] != x[i]) return false;
  size_t i = lead;
  for (int64_t t : tail)
    if (dims[i++] != t) return false;
  return true;
}

ffi::Error Bad(const std::string& what) { return ffi::Error::InvalidArgument(what); }

// Batch rows are short streams (4 KiB at m = 1024) at random places of a matrix
// that the previous step's product has just written: the hardware prefetcher
// learns each one too late. Fetch the next row while this one is processed.
template <typename T>
inline void PrefetchRow(const T* row, int64_t cols) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t c = 0; c < cols; c += kLine) __builtin_prefetch(row + c, 0, 3);
}

// Calls fn(u, s, row) for every unit u = (member s = u / B, batch point u % B),
// row pointing at X's clamped batch row, split over the pool; the next row of a
// chunk is prefetched while fn works on this one.
template <typename T, typename F>
void ForEachBatchRow(ffi::ThreadPool& pool, const Stack& x, int64_t B, const int32_t* idx,
                     const T* src, const F& fn) {
  const int64_t grain = kGrainElements / std::max<int64_t>(x.cols, 1);
  ParallelFor(pool, x.lead * B, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u) {
      if (u + 1 < hi) PrefetchRow(src + RowOffset(u + 1, B, idx, x), x.cols);
      fn(u, u / B, src + RowOffset(u, B, idx, x));
    }
  });
}

#if defined(__x86_64__) && defined(__GNUC__)
#define KRONJAX_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define KRONJAX_CLONES
#endif

// --------------------------------------------------------------------------- take / add

template <ffi::DataType DT>
ffi::Error TakeRows(ffi::ThreadPool pool, ffi::Buffer<DT> x_buf, ffi::Buffer<ffi::S32> idx_buf,
                    ffi::Result<ffi::Buffer<DT>> out) {
  using T = ffi::NativeType<DT>;
  Stack x;
  const int64_t B = idx_buf.element_count();
  if (!AsStack(x_buf.dimensions(), &x) || !Leading(x_buf.dimensions(), out->dimensions(), {B, x.cols}))
    return Bad("kronjax take_rows: X (..., n, m) and the result (..., B, m) do not match");
  if (x.rows == 0 && B > 0) return Bad("kronjax take_rows: X has no rows");
  const int32_t* idx = idx_buf.typed_data();
  const T* src = x_buf.typed_data();
  T* dst = out->typed_data();
  ForEachBatchRow(pool, x, B, idx, src, [&](int64_t u, int64_t, const T* row) {
    std::memcpy(dst + u * x.cols, row, sizeof(T) * x.cols);
  });
  return ffi::Error::Success();
}

// The batch's columns of a neuron-major P (m, n), transposed: (B, m). XLA CPU gathers
// them with an index computation per element (about 1 ms for B = 32 of a 4096 x 1024
// P, more than the full-path product). Here: blocks of 64 neurons per work unit; per
// batch point, its entries of the block's rows are read (the block's rows stay in L2
// across the B points) and written as one contiguous run of the output.
template <ffi::DataType DT>
ffi::Error TakeCols(ffi::ThreadPool pool, ffi::Buffer<DT> x_buf, ffi::Buffer<ffi::S32> idx_buf,
                    ffi::Result<ffi::Buffer<DT>> out) {
  using T = ffi::NativeType<DT>;
  Stack x;
  const int64_t B = idx_buf.element_count();
  if (!AsStack(x_buf.dimensions(), &x) || !Leading(x_buf.dimensions(), out->dimensions(), {B, x.rows}))
    return Bad("kronjax take_cols: P (..., m, n) and the result (..., B, m) do not match");
  if (x.cols == 0 && B > 0) return Bad("kronjax take_cols: P has no columns");
  std::vector<int64_t> cols(B);
  for (int64_t i = 0; i < B; ++i) cols[i] = Clamp(Normalize(idx_buf.typed_data()[i], x.cols), x.cols);
  constexpr int64_t kBlock = 64;  // neurons per work unit
  const int64_t blocks = (x.rows + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(B * kBlock, 1));
  const T* src = x_buf.typed_data();
  T* dst = out->typed_data();
  ParallelFor(pool, x.lead * blocks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t s = u / blocks, j0 = (u % blocks) * kBlock;
      const int64_t j1 = std::min(x.rows, j0 + kBlock);
      const T* P = src + s * x.rows * x.cols;
      T* o = dst + s * B * x.rows;
      for (int64_t b = 0; b < B; ++b) {
        const T* col = P + cols[b];
        T* out_b = o + b * x.rows;
        for (int64_t j = j0; j < j1; ++j) out_b[j] = col[j * x.cols];
      }
    }
  });
  return ffi::Error::Success();
}

template <typename T>
KRONJAX_CLONES void AddRow(T* __restrict__ x, const T* __restrict__ u, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) x[c] += u[c];
}

template <ffi::DataType DT>
ffi::Error AddRows(ffi::ThreadPool pool, ffi::Buffer<DT> x_buf, ffi::Buffer<ffi::S32> idx_buf,
                   ffi::Buffer<DT> u_buf, ffi::Result<ffi::Buffer<DT>> out) {
  using T = ffi::NativeType<DT>;
  Stack x;
  const int64_t B = idx_buf.element_count();
  if (!AsStack(x_buf.dimensions(), &x) || !Leading(x_buf.dimensions(), u_buf.dimensions(), {B, x.cols}))
    return Bad("kronjax add_rows: X (..., n, m) and U (..., B, m) do not match");
  const int32_t* idx = idx_buf.typed_data();
  T* o = out->typed_data();
  if (o != x_buf.typed_data())  // XLA could not alias
    std::memcpy(o, x_buf.typed_data(), sizeof(T) * x.lead * x.rows * x.cols);
  const T* us = u_buf.typed_data();
  // Work units are (member, column block), so a repeated index stays in one
  // thread. With several members a block is a whole row (one stream per row);
  // a single member is split into column blocks to use more than one thread.
  const int64_t block = x.lead > 1 ? x.cols : 256;
  const int64_t blocks = (x.cols + block - 1) / std::max<int64_t>(block, 1);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(B * block, 1));
  ParallelFor(pool, x.lead * blocks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t s = w / blocks, c0 = (w % blocks) * block;
      const int64_t width = std::min(block, x.cols - c0);
      for (int64_t i = 0; i < B; ++i) {
        const int64_t j = Normalize(idx[i], x.rows);
        if (j < 0 || j >= x.rows) continue;  // dropped, as X.at[idx].add drops it
        if (i + 1 < B) {
          const int64_t next = Clamp(Normalize(idx[i + 1], x.rows), x.rows);
          PrefetchRow(o + (s * x.rows + next) * x.cols + c0, width);
        }
        AddRow(o + (s * x.rows + j) * x.cols + c0, us + (s * B + i) * x.cols + c0, width);
      }
    }
  });
  return ffi::Error::Success();
}

// --------------------------------------------------------------------------- touched rows

// x += sum_b u[b] r[b, :] (r: B rows of `cols`), one axpy per nonzero u[b] while the row
// is in cache. Exact up to rounding order: a skipped term is 0 * r, zero for the finite
// Gram rows.
template <typename T>
KRONJAX_CLONES void AddRowProduct(T* __restrict__ x, const T* __restrict__ u,
                                  const T* __restrict__ r, int64_t B, int64_t cols) {
  for (int64_t b = 0; b < B; ++b) {
    const T ub = u[b];
    if (ub == T(0)) continue;
    const T* __restrict__ rb = r + b * cols;
    for (int64_t c = 0; c < cols; ++c) x[c] += ub * rb[c];
  }
}

// add_rows_product(X (..., rows, cols), T (..., Tc) int32, U (..., Tc, B), R (..., B, cols))
//   -> X, in place: X[..., T[t], :] += U[..., t, :] @ R.
// The sparse step's update of its touched rows: each row is read and written once and
// its update never exists as a (Tc, cols) array. A member's ids must be unique (its rows
// are split over threads); out-of-range ones (the padding) are dropped. R's leading
// dimensions are X's or all 1 (shared).
template <ffi::DataType DT>
ffi::Error AddRowsProduct(ffi::ThreadPool pool, ffi::Buffer<DT> x_buf, ffi::Buffer<ffi::S32> t_buf,
                          ffi::Buffer<DT> u_buf, ffi::Buffer<DT> r_buf,
                          ffi::Result<ffi::Buffer<DT>> out) {
  using T = ffi::NativeType<DT>;
  Stack x;
  const auto xd = x_buf.dimensions(), td = t_buf.dimensions(), ud = u_buf.dimensions(),
             rd = r_buf.dimensions();
  if (!AsStack(xd, &x) || td.size() == 0) return Bad("kronjax add_rows_product: X (..., n, m), T (..., Tc)");
  const int64_t tc = td[td.size() - 1], B = ud.size() == 0 ? 0 : ud[ud.size() - 1];
  if (!Leading(xd, td, {tc}) || !Leading(xd, ud, {tc, B}))
    return Bad("kronjax add_rows_product: T (..., Tc), U (..., Tc, B) and X (..., n, m) do not match");
  bool shared = rd.size() == xd.size();
  for (size_t i = 0; shared && i + 2 < xd.size(); ++i) shared = rd[i] == 1;
  if (rd.size() != xd.size() || rd[rd.size() - 2] != B || rd[rd.size() - 1] != x.cols ||
      (!shared && !Leading(xd, rd, {B, x.cols})))
    return Bad("kronjax add_rows_product: R must be (..., B, m) with X's leading dimensions or 1s");
  T* o = out->typed_data();
  if (o != x_buf.typed_data())  // XLA could not alias
    std::memcpy(o, x_buf.typed_data(), sizeof(T) * x.lead * x.rows * x.cols);
  const int32_t* rows = t_buf.typed_data();
  const T *us = u_buf.typed_data(), *rs = r_buf.typed_data();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(x.cols * B, 1));
  ParallelFor(pool, x.lead * tc, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t s = w / tc, j = rows[w];
      if (j < 0 || j >= x.rows) continue;  // padding: dropped, as X.at[T].add drops it
      AddRowProduct(o + (s * x.rows + j) * x.cols, us + w * B, rs + (shared ? 0 : s) * B * x.cols,
                    B, x.cols);
    }
  });
  return ffi::Error::Success();
}

// --------------------------------------------------------------------------- the hidden layer

// relu(z - b), with a NaN z kept (as jax.nn.relu keeps it).
template <typename T>
inline T ReluOf(T z, T b) {
  const T d = z - b;
  return z > b ? d : (d == d ? T(0) : d);
}

// Independent partial sums: a float reduction vectorizes only when its lanes
// are spelled out (the compiler may not reorder one running sum).
constexpr int kLanes = 16;

// One output (C == 1): returns sum_r relu(z[r] - b) * a[r] and sets *count to #(z > b).
template <typename T>
KRONJAX_CLONES T ReluDot(const T* __restrict__ z, T b, const T* __restrict__ a, int64_t m,
                         int64_t* count) {
  T acc[kLanes] = {};
  int32_t active[kLanes] = {};
  int64_t r = 0;
  for (; r + kLanes <= m; r += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      acc[l] += ReluOf(z[r + l], b) * a[r + l];
      active[l] += z[r + l] > b;
    }
  T total = 0;
  int64_t n = 0;
  for (int l = 0; l < kLanes; ++l) {
    total += acc[l];
    n += active[l];
  }
  for (; r < m; ++r) {
    total += ReluOf(z[r], b) * a[r];
    n += z[r] > b;
  }
  *count = n;
  return total;
}

// h[r] = relu(z[r] - b); returns #(z > b).
template <typename T>
KRONJAX_CLONES int64_t Relu(const T* __restrict__ z, T b, int64_t m, T* __restrict__ h) {
  int64_t count = 0;
  for (int64_t r = 0; r < m; ++r) {
    h[r] = ReluOf(z[r], b);
    count += z[r] > b;
  }
  return count;
}

// The operands both hidden-layer kernels take: X (..., n, m), b (...),
// a (..., m, C). Sets *x and *C; returns what is wrong, or nullptr.
const char* HiddenOperands(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> bd,
                           ffi::Span<const int64_t> ad, int64_t B, Stack* x, int64_t* C) {
  if (!AsStack(xd, x) || ad.size() != xd.size())
    return "a must be (..., m, C) with X's leading dimensions";
  *C = ad.back();
  if (!Leading(xd, ad, {x->cols, *C}) || !Leading(xd, bd, {}))
    return "b (...) and a (..., m, C) do not match X (..., n, m)";
  if (x->rows == 0 && B > 0) return "X has no rows";
  return nullptr;
}

template <ffi::DataType DT>
ffi::Error ReluRows(ffi::ThreadPool pool, ffi::Buffer<DT> x_buf, ffi::Buffer<ffi::S32> idx_buf,
                    ffi::Buffer<DT> b_buf, ffi::Buffer<DT> a_buf, ffi::Result<ffi::Buffer<DT>> out,
                    ffi::Result<ffi::Buffer<DT>> count) {
  using T = ffi::NativeType<DT>;
  Stack x;
  int64_t C = 0;
  const int64_t B = idx_buf.element_count();
  const auto xd = x_buf.dimensions();
  if (const char* e = HiddenOperands(xd, b_buf.dimensions(), a_buf.dimensions(), B, &x, &C))
    return Bad(std::string("kronjax relu_rows: ") + e);
  if (!Leading(xd, out->dimensions(), {B, C}) || !Leading(xd, count->dimensions(), {B}))
    return Bad("kronjax relu_rows: the results do not match X (..., n, m) and idx (B,)");
  const int32_t* idx = idx_buf.typed_data();
  const T *src = x_buf.typed_data(), *bs = b_buf.typed_data(), *as = a_buf.typed_data();
  T *os = out->typed_data(), *cs = count->typed_data();
  ForEachBatchRow(pool, x, B, idx, src, [&](int64_t u, int64_t s, const T* z) {
    const T* a = as + s * x.cols * C;
    T* o = os + u * C;
    if (C == 1) {  // one fused, vectorized pass
      int64_t active = 0;
      o[0] = ReluDot(z, bs[s], a, x.cols, &active);
      cs[u] = static_cast<T>(active);
      return;
    }
    thread_local std::vector<T> h;
    h.resize(x.cols);
    cs[u] = static_cast<T>(Relu(z, bs[s], x.cols, h.data()));
    std::fill(o, o + C, T(0));
    for (int64_t r = 0; r < x.cols; ++r) {
      if (h[r] == T(0)) continue;  // inactive: exact for finite a
      for (int64_t c = 0; c < C; ++c) o[c] += h[r] * a[r * C + c];
    }
  });
  return ffi::Error::Success();
}

// grad[r] = z[r] > b ? g * a[r] : 0 for one output (C == 1), vectorized.
template <typename T>
KRONJAX_CLONES void MaskedScale(const T* __restrict__ z, T b, T g, const T* __restrict__ a,
                                int64_t m, T* __restrict__ grad) {
  for (int64_t r = 0; r < m; ++r) {
    const T v = g * a[r];  // unconditional, so the loop vectorizes
    grad[r] = z[r] > b ? v : T(0);
  }
}

template <ffi::DataType DT>
ffi::Error ReluRowsGrad(ffi::ThreadPool pool, ffi::Buffer<DT> x_buf, ffi::Buffer<ffi::S32> idx_buf,
                        ffi::Buffer<DT> b_buf, ffi::Buffer<DT> a_buf, ffi::Buffer<DT> g_buf,
                        ffi::Result<ffi::Buffer<DT>> out) {
  using T = ffi::NativeType<DT>;
  Stack x;
  int64_t C = 0;
  const int64_t B = idx_buf.element_count();
  const auto xd = x_buf.dimensions();
  if (const char* e = HiddenOperands(xd, b_buf.dimensions(), a_buf.dimensions(), B, &x, &C))
    return Bad(std::string("kronjax relu_rows_grad: ") + e);
  if (!Leading(xd, g_buf.dimensions(), {B, C}) || !Leading(xd, out->dimensions(), {B, x.cols}))
    return Bad("kronjax relu_rows_grad: g or the result does not match X (..., n, m) and idx (B,)");
  const int32_t* idx = idx_buf.typed_data();
  const T *src = x_buf.typed_data(), *bs = b_buf.typed_data(), *as = a_buf.typed_data();
  const T* gs = g_buf.typed_data();
  T* os = out->typed_data();
  ForEachBatchRow(pool, x, B, idx, src, [&](int64_t u, int64_t s, const T* z) {
    const T* a = as + s * x.cols * C;
    const T* g = gs + u * C;
    T* o = os + u * x.cols;
    if (C == 1) {
      MaskedScale(z, bs[s], g[0], a, x.cols, o);
      return;
    }
    for (int64_t r = 0; r < x.cols; ++r) {
      T dot = 0;
      if (z[r] > bs[s])
        for (int64_t c = 0; c < C; ++c) dot += g[c] * a[r * C + c];
      o[r] = dot;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// Every row kernel takes the thread pool, X and idx first.
#define KRONJAX_ROWS_BIND(DT) \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<DT>>().Arg<ffi::Buffer<ffi::S32>>()

#define KRONJAX_ROWS_HANDLERS(suffix, DT)                                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kronjax_take_rows_##suffix, TakeRows<DT>,                    \
                                KRONJAX_ROWS_BIND(DT).Ret<ffi::Buffer<DT>>());               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kronjax_take_cols_##suffix, TakeCols<DT>,                    \
                                KRONJAX_ROWS_BIND(DT).Ret<ffi::Buffer<DT>>());               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kronjax_add_rows_##suffix, AddRows<DT>,                      \
                                KRONJAX_ROWS_BIND(DT)                                        \
                                    .Arg<ffi::Buffer<DT>>()  /* U */                         \
                                    .Ret<ffi::Buffer<DT>>());                                \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kronjax_relu_rows_##suffix, ReluRows<DT>,                    \
                                KRONJAX_ROWS_BIND(DT)                                        \
                                    .Arg<ffi::Buffer<DT>>()  /* b */                         \
                                    .Arg<ffi::Buffer<DT>>()  /* a */                         \
                                    .Ret<ffi::Buffer<DT>>()  /* h @ a */                     \
                                    .Ret<ffi::Buffer<DT>>()); /* count */                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kronjax_relu_rows_grad_##suffix, ReluRowsGrad<DT>,           \
                                KRONJAX_ROWS_BIND(DT)                                        \
                                    .Arg<ffi::Buffer<DT>>()  /* b */                         \
                                    .Arg<ffi::Buffer<DT>>()  /* a */                         \
                                    .Arg<ffi::Buffer<DT>>()  /* g */                         \
                                    .Ret<ffi::Buffer<DT>>());

#define KRONJAX_ROWS_PRODUCT_HANDLER(suffix, DT)                                              \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(kronjax_add_rows_product_##suffix, AddRowsProduct<DT>,       \
                                KRONJAX_ROWS_BIND(DT)                                        \
                                    .Arg<ffi::Buffer<DT>>()  /* U */                         \
                                    .Arg<ffi::Buffer<DT>>()  /* R */                         \
                                    .Ret<ffi::Buffer<DT>>()); /* X */

KRONJAX_ROWS_PRODUCT_HANDLER(f32, ffi::DataType::F32)
KRONJAX_ROWS_PRODUCT_HANDLER(f64, ffi::DataType::F64)
KRONJAX_ROWS_HANDLERS(f32, ffi::DataType::F32)
KRONJAX_ROWS_HANDLERS(f64, ffi::DataType::F64)

// The number of threads ParallelFor may use here (XLA's intra-op pool): tests
// check that a multi-threaded split is really reached.
namespace {
ffi::Error PoolThreads(ffi::ThreadPool pool, ffi::Result<ffi::Buffer<ffi::S32>> out) {
  *out->typed_data() = static_cast<int32_t>(pool.num_threads());
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kronjax_pool_threads, PoolThreads,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Ret<ffi::Buffer<ffi::S32>>());
