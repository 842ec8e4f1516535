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
// The gemm entry points are scipy's (scipy.linalg.cython_blas, LP64 Fortran
// ABI), handed over once by kronjax_set_blas: no link-time BLAS dependency.

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename T>
using GemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const T*,
                        const T*, const int*, const T*, const int*, const T*, T*, const int*);

GemmFn<float> sgemm = nullptr;
GemmFn<double> dgemm = nullptr;

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

// kTransposedG: G arrives as its transpose, (..., k, r) row-major, and the
// product is X + G^T @ R (the point-major P's Gram rows, K[S, :] (B, n), need no
// transposed copy: BLAS reads them transposed).
template <ffi::DataType DT, bool kTransposedG>
ffi::Error AddProduct(ffi::Buffer<DT> x_buf, ffi::Buffer<DT> g, ffi::Buffer<DT> r,
                      ffi::Result<ffi::Buffer<DT>> out) {
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

  const T* x = x_buf.typed_data();
  T* o = out->typed_data();
  if (o != x) std::memcpy(o, x, sizeof(T) * batch * rows * cols);  // XLA could not alias
  if (k == 0 || rows == 0 || cols == 0) return ffi::Error::Success();

  const int M = static_cast<int>(cols), N = static_cast<int>(rows), K = static_cast<int>(k);
  const T one = 1;
  for (int64_t s = 0; s < batch; ++s) {
    const T* gs = g.typed_data() + BroadcastOffset(s, xd, gd) * rows * k;
    const T* rs = r.typed_data() + BroadcastOffset(s, xd, rd) * k * cols;
    if (MostlyZero(gs, rows * k))
      AddSparseProduct(o + s * rows * cols, gs, rs, rows, cols, k, kTransposedG ? 1 : k,
                       kTransposedG ? rows : 1);
    else if (kTransposedG)
      fn("N", "T", &M, &N, &K, &one, rs, &M, gs, &N, &one, o + s * rows * cols, &M);
    else
      fn("N", "N", &M, &N, &K, &one, rs, &M, gs, &K, &one, o + s * rows * cols, &M);
  }
  return ffi::Error::Success();
}

}  // namespace

extern "C" void kronjax_set_blas(void* sgemm_fn, void* dgemm_fn) {
  sgemm = reinterpret_cast<GemmFn<float>>(sgemm_fn);
  dgemm = reinterpret_cast<GemmFn<double>>(dgemm_fn);
}

// One handler per dtype and G layout: X, G, R in, the result (aliased to X) out.
#define KRONJAX_ADD_PRODUCT_HANDLER(name, DT, transposed)                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (AddProduct<DT, transposed>),           \
                                ffi::Ffi::Bind()                              \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Arg<ffi::Buffer<DT>>()                   \
                                    .Ret<ffi::Buffer<DT>>());

KRONJAX_ADD_PRODUCT_HANDLER(kronjax_add_product_f32, ffi::DataType::F32, false)
KRONJAX_ADD_PRODUCT_HANDLER(kronjax_add_product_f64, ffi::DataType::F64, false)
KRONJAX_ADD_PRODUCT_HANDLER(kronjax_add_product_t_f32, ffi::DataType::F32, true)
KRONJAX_ADD_PRODUCT_HANDLER(kronjax_add_product_t_f64, ffi::DataType::F64, true)
