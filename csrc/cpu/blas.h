// Row-major GEMM on raw pointers for the CPU kernels:  C (m x n) = op(A) op(B) + beta C,
// op(A) (m x k) = A or A^T (A stored k x m when transposed), likewise op(B) (k x n); ld* = row strides.
//
// A training step of the fused residual layer makes thousands of tile-sized products (e.g. 64 x 96 by
// 96 x 256). Through at::mm_out on tensor views each pays several microseconds of dispatch, view and
// shape checks; this calls the BLAS that libtorch_cpu links and exports (sgemm_/dgemm_: MKL in the
// x86 wheels) directly. Where torch exports no such symbol (weak references stay null), or when
// WAVENET_AE_CPU_GEMM=aten is set (tests use it to cover this path), it goes through at::mm.
// Called inside at::parallel_for regions: MKL then runs single-threaded (nested OpenMP).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace wavenet_ae::cpu {

inline bool use_exported_blas() {
  static const bool ok = [] {
    const char* env = std::getenv("WAVENET_AE_CPU_GEMM");
    return sgemm_ != nullptr && dgemm_ != nullptr && !(env && std::strcmp(env, "aten") == 0);
  }();
  return ok;
}

// "blas" or "aten": which path gemm() takes here.
inline const char* gemm_path() { return use_exported_blas() ? "blas" : "aten"; }

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
          T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (use_exported_blas()) {
    // Column-major BLAS sees the row-major C as C^T = op(B)^T op(A)^T.
    const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    const T one = 1;
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&tB, &tA, &M, &N, &K, &one, B, &lb, A, &la, &beta, C, &lc);
    } else {
      dgemm_(&tB, &tA, &M, &N, &K, &one, B, &lb, A, &la, &beta, C, &lc);
    }
    return;
  }
  const auto o = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    at::Tensor v = at::from_blob(const_cast<T*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, o);
    return t ? v.t() : v;
  };
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, o);
  const at::Tensor prod = at::mm(view(A, m, k, lda, ta), view(B, k, n, ldb, tb));
  if (beta == T(0)) {
    c.copy_(prod);
  } else {
    c.mul_(beta).add_(prod);
  }
}

}  // namespace wavenet_ae::cpu
