// varjax/cpu_gemm.py's XLA FFI handler: C = A B for row-major float32 A (M, K) and B (K, N),
// through a Fortran-interface sgemm whose address Python hands over (MKL's, from the torch
// wheel) before the handler is first called. Built by varjax/cpu_gemm.py; not a Python
// extension (it is loaded with ctypes and registered with jax.ffi).
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

typedef void (*Sgemm)(const char* transa, const char* transb, const int* m, const int* n,
                      const int* k, const float* alpha, const float* a, const int* lda,
                      const float* b, const int* ldb, const float* beta, float* c,
                      const int* ldc);

static Sgemm g_sgemm = nullptr;

extern "C" void varjax_set_sgemm(void* sgemm) { g_sgemm = reinterpret_cast<Sgemm>(sgemm); }

static ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> c) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("varjax_cpu_gemm: no sgemm was set");
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
  const int m = static_cast<int>(M), k = static_cast<int>(K), n = static_cast<int>(N);
  const float one = 1.0f, zero = 0.0f;
  // One call for all rows. MKL picks its kernels by the matrix size, so a row's last bits
  // can depend on how many rows share the call: varjax/cpu_gemm.py keeps the sampler, whose
  // images must not depend on the batch size, on XLA's products. (Equal zero-padded tiles of
  // rows make every row's bits the same, but re-pack B per tile and lose MKL's advantage.)
  // Row-major C = A B is column-major C^T = B^T A^T: the same memory, operands swapped.
  g_sgemm("N", "N", &n, &m, &k, &one, b.typed_data(), &n, a.typed_data(), &k, &zero,
          c->typed_data(), &n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VarjaxCpuGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
