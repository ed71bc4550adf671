// Mu-law companding: the scalar math shared by the CPU and CUDA kernels, and the argument checks.
//
// Both kernels evaluate exactly these functions in double precision, in the same operation order as
// the PyTorch reference in wavenet_ae/ops/mu_law.py (mu_law_encode_ref / mu_law_decode_ref), with no
// multiply-add fused into an FMA (one rounding instead of two), so encoded classes match the reference
// exactly: on the device mul_rn/add_rn are CUDA's never-contracted _rn intrinsics; on the host the
// including .cpp turns contraction off for its translation unit (csrc/cpu/mu_law.cpp). This is local on
// purpose: other kernels keep the compilers' default FMA contraction.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "host_device.h"

namespace wavenet_ae {

// Largest supported number of classes (16-bit mu-law). Keeps every class exactly representable.
constexpr int64_t kMaxQuant = 65536;

WN_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

WN_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// mu = n_quant - 1, log1p_mu = log1p(mu): computed once on the host.
struct MuLawConsts {
  double mu;
  double log1p_mu;
};

inline MuLawConsts mu_law_consts(int64_t n_quant) {
  const double mu = static_cast<double>(n_quant - 1);
  return {mu, std::log1p(mu)};
}

// x (any float, clamped to [-1, 1]; NaN is treated as 0) -> class in [0, mu].
//   y = sign(x) * log1p(mu |x|) / log1p(mu);  q = floor((y + 1) / 2 * mu + 0.5)
WN_HD int64_t mu_law_encode_one(double x, MuLawConsts c) {
  if (x != x) x = 0.0;  // NaN
  x = x < -1.0 ? -1.0 : (x > 1.0 ? 1.0 : x);
  const double mag = ::log1p(mul_rn(c.mu, ::fabs(x))) / c.log1p_mu;
  const double y = x < 0.0 ? -mag : mag;
  const double q = ::floor(add_rn(mul_rn(add_rn(y, 1.0) / 2.0, c.mu), 0.5));
  return static_cast<int64_t>(q < 0.0 ? 0.0 : (q > c.mu ? c.mu : q));
}

// class q (clamped to [0, mu]) -> x in [-1, 1].
//   y = 2 q / mu - 1;  x = sign(y) * ((1 + mu)^|y| - 1) / mu
WN_HD float mu_law_decode_one(int64_t q, MuLawConsts c) {
  double qd = static_cast<double>(q);
  qd = qd < 0.0 ? 0.0 : (qd > c.mu ? c.mu : qd);
  const double y = add_rn(mul_rn(2.0, qd) / c.mu, -1.0);
  const double mag = add_rn(::pow(1.0 + c.mu, ::fabs(y)), -1.0) / c.mu;
  return static_cast<float>(y < 0.0 ? -mag : mag);
}

inline void check_n_quant(int64_t n_quant, const char* op) {
  TORCH_CHECK(n_quant >= 2 && n_quant <= kMaxQuant, op, ": n_quant must be in [2, ", kMaxQuant,
              "], got ", n_quant);
}

inline void check_encode_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be a floating-point tensor (audio in [-1, 1]), got dtype ", x.scalar_type(),
              " with shape ", x.sizes());
}

inline void check_decode_input(const at::Tensor& q, const char* op) {
  TORCH_CHECK(at::isIntegralType(q.scalar_type(), /*includeBool=*/false), op,
              ": q must be an integer tensor of mu-law classes, got dtype ", q.scalar_type(),
              " with shape ", q.sizes());
}

}  // namespace wavenet_ae
