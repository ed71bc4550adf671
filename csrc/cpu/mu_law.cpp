// Mu-law encode/decode, CPU kernels. Scalar math lives in mu_law.h (shared with the CUDA kernels).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

// No FMA contraction in this file (see mu_law.h): results must round like the PyTorch reference
// even when the build adds -march flags that enable FMA instructions.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "mu_law.h"

namespace wavenet_ae {
namespace {

// log1p/pow cost tens of ns per element, so chunks much smaller than at::internal::GRAIN_SIZE pay off.
constexpr int64_t kGrain = 4096;

void check_cpu(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got device ", t.device());
}

at::Tensor mu_law_encode_cpu(const at::Tensor& x, int64_t n_quant) {
  constexpr const char* op = "wavenet_ae::mu_law_encode";
  check_cpu(x, op, "x");
  check_encode_input(x, op);
  check_n_quant(n_quant, op);

  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kLong));
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const MuLawConsts c = mu_law_consts(n_quant);
  int64_t* dst = out.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "mu_law_encode_cpu", [&] {
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = mu_law_encode_one(static_cast<double>(src[i]), c);
      }
    });
  });
  return out;
}

at::Tensor mu_law_decode_cpu(const at::Tensor& q, int64_t n_quant) {
  constexpr const char* op = "wavenet_ae::mu_law_decode";
  check_cpu(q, op, "q");
  check_decode_input(q, op);
  check_n_quant(n_quant, op);

  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  const int64_t n = qc.numel();
  if (n == 0) return out;
  const MuLawConsts c = mu_law_consts(n_quant);
  float* dst = out.data_ptr<float>();

  AT_DISPATCH_INTEGRAL_TYPES(qc.scalar_type(), "mu_law_decode_cpu", [&] {
    const scalar_t* src = qc.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = mu_law_decode_one(static_cast<int64_t>(src[i]), c);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(wavenet_ae, CPU, m) {
  m.impl("mu_law_encode", &mu_law_encode_cpu);
  m.impl("mu_law_decode", &mu_law_decode_cpu);
}

}  // namespace wavenet_ae
