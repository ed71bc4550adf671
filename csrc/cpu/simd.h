// Run-time selected x86 SIMD for the CPU kernels: the portable build (no -march) compiles AVX2+FMA
// functions with target attributes and calls them only where cpu_has_avx2() says the CPU has both.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#define WN_HAVE_X86 1
#include <immintrin.h>
#define WN_AVX2 __attribute__((target("avx2,fma")))
#else
#define WN_HAVE_X86 0
#endif

namespace wavenet_ae::cpu {

#if WN_HAVE_X86
inline bool cpu_has_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}

// exp with the Cephes polynomial (as in avx_mathfun): relative error ~1e-7 on [-88, 88].
WN_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, one));
  __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  e = _mm256_slli_epi32(e, 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#else
inline bool cpu_has_avx2() { return false; }
#endif

}  // namespace wavenet_ae::cpu
