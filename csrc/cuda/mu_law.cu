// Mu-law encode/decode, CUDA kernels. Scalar math lives in mu_law.h (shared with the CPU kernels).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "mu_law.h"

// Deliberately not <ATen/cuda/CUDAContext.h>: it pulls in cuBLAS/cuSPARSE headers, which a minimal
// CUDA toolkit (nvcc + cudart only) does not ship.

namespace wavenet_ae {
namespace {

using launch::check_cuda;
using launch::kThreads;
using launch::num_blocks;

template <typename in_t, typename out_t>
struct ElementwiseParams {
  const in_t* __restrict__ in;
  out_t* __restrict__ out;
  int64_t n;
  MuLawConsts c;
};

// `in` (contiguous) -> `out` (same number of elements), n_quant classes.
template <typename in_t, typename out_t>
ElementwiseParams<in_t, out_t> set_params(const at::Tensor& in, at::Tensor& out, int64_t n_quant) {
  ElementwiseParams<in_t, out_t> p{};
  p.in = in.const_data_ptr<in_t>();
  p.out = out.data_ptr<out_t>();
  p.n = in.numel();
  p.c = mu_law_consts(n_quant);
  return p;
}

template <typename scalar_t>
__global__ void mu_law_encode_kernel(ElementwiseParams<scalar_t, int64_t> p) {
  WN_GRID_STRIDE_LOOP(i, p.n) { p.out[i] = mu_law_encode_one(static_cast<double>(p.in[i]), p.c); }
}

template <typename scalar_t>
__global__ void mu_law_decode_kernel(ElementwiseParams<scalar_t, float> p) {
  WN_GRID_STRIDE_LOOP(i, p.n) { p.out[i] = mu_law_decode_one(static_cast<int64_t>(p.in[i]), p.c); }
}

at::Tensor mu_law_encode_cuda(const at::Tensor& x, int64_t n_quant) {
  constexpr const char* op = "wavenet_ae::mu_law_encode";
  check_cuda(x, op, "x");
  check_encode_input(x, op);
  check_n_quant(n_quant, op);

  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kLong));
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "mu_law_encode_cuda", [&] {
    const auto p = set_params<scalar_t, int64_t>(xc, out, n_quant);
    mu_law_encode_kernel<scalar_t><<<num_blocks(n), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor mu_law_decode_cuda(const at::Tensor& q, int64_t n_quant) {
  constexpr const char* op = "wavenet_ae::mu_law_decode";
  check_cuda(q, op, "q");
  check_decode_input(q, op);
  check_n_quant(n_quant, op);

  const c10::cuda::CUDAGuard device_guard(q.device());
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  const int64_t n = qc.numel();
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_INTEGRAL_TYPES(qc.scalar_type(), "mu_law_decode_cuda", [&] {
    const auto p = set_params<scalar_t, float>(qc, out, n_quant);
    mu_law_decode_kernel<scalar_t><<<num_blocks(n), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(wavenet_ae, CUDA, m) {
  m.impl("mu_law_encode", &mu_law_encode_cuda);
  m.impl("mu_law_decode", &mu_law_decode_cuda);
}

}  // namespace wavenet_ae
