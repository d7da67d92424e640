// varjax/cpu_gemm.py's XLA FFI handler: C = A B for row-major float32 A (M, K) and B (K, N),
// through MKL's packed-matrix GEMM (cblas_sgemm_pack_get_size / _pack / _compute, from the
// torch wheel's MKL), whose addresses Python hands over before the handler is first called.
// Built by varjax/cpu_gemm.py; not a Python extension (loaded with ctypes, registered with
// jax.ffi).
//
// Why the packed API and not plain sgemm: plain sgemm picks its kernels by the matrix size,
// so a row's last bits can depend on how many rows share the call; with B packed (for this
// call's M) and A passed as is, every row of C came out bit for bit the same whatever the
// number of rows (2 and up) and wherever the row sat among them, at the same speed as plain
// sgemm (tests/test_cpu_gemm.py checks the invariance). A single row takes another path, so
// M = 1 is computed as two equal rows. The sampler promises an image independent of the
// batch size, and this is what lets it use MKL too.
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// MKL's CBLAS enums.
enum { kRowMajor = 101, kNoTrans = 111, kPacked = 151, kBMatrix = 162 };

typedef size_t (*PackGetSize)(int identifier, int m, int n, int k);
typedef void (*Pack)(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                     const float* src, int ld, float* dest);
typedef void (*Compute)(int layout, int transa, int transb, int m, int n, int k, const float* a,
                        int lda, const float* b, int ldb, float beta, float* c, int ldc);

static PackGetSize g_get_size = nullptr;
static Pack g_pack = nullptr;
static Compute g_compute = nullptr;

extern "C" void varjax_set_mkl(void* get_size, void* pack, void* compute) {
  g_get_size = reinterpret_cast<PackGetSize>(get_size);
  g_pack = reinterpret_cast<Pack>(pack);
  g_compute = reinterpret_cast<Compute>(compute);
}

static ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> c) {
  if (g_compute == nullptr) return ffi::Error::Internal("varjax_cpu_gemm: MKL was not set");
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != 2 || db.size() != 2 || da[1] != db[0])
    return ffi::Error::InvalidArgument("varjax_cpu_gemm: expected A (M, K) and B (K, N)");
  const int64_t M = da[0], K = da[1], N = db[1];
  if (M > INT32_MAX || K > INT32_MAX || N > INT32_MAX)
    return ffi::Error::InvalidArgument("varjax_cpu_gemm: a dimension exceeds 32 bits");
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(c->typed_data(), 0, sizeof(float) * M * N);
    return ffi::Error::Success();
  }
  const int k = static_cast<int>(K), n = static_cast<int>(N);
  const float* pa = a.typed_data();
  float* pc = c->typed_data();
  // Per-thread scratch, kept between calls (XLA may run two handlers at once on two threads):
  // the packed B, and for M = 1 the doubled row and its two-row result.
  thread_local std::vector<float> packed, row2, out2;
  const bool single_row = M == 1;
  int m = static_cast<int>(M);
  if (single_row) {
    row2.resize(2 * K);
    out2.resize(2 * N);
    std::memcpy(row2.data(), pa, sizeof(float) * K);
    std::memcpy(row2.data() + K, pa, sizeof(float) * K);
    pa = row2.data();
    pc = out2.data();
    m = 2;
  }
  const size_t bytes = g_get_size(kBMatrix, m, n, k);
  packed.resize(bytes / sizeof(float) + 1);
  g_pack(kRowMajor, kBMatrix, kNoTrans, m, n, k, 1.0f, b.typed_data(), n, packed.data());
  g_compute(kRowMajor, kNoTrans, kPacked, m, n, k, pa, k, packed.data(), n, 0.0f, pc, n);
  if (single_row) std::memcpy(c->typed_data(), pc, sizeof(float) * N);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VarjaxCpuGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
