// Mu-law encode/decode, CUDA kernels. Scalar math lives in mulaw.h (shared with the CPU kernels).
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mulaw.h"

// Deliberately not <ATen/cuda/CUDAContext.h>: it pulls in cuBLAS/cuSPARSE headers, which a minimal
// CUDA toolkit (nvcc + cudart only) does not ship.

namespace wavenet_ae {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loop covers the rest

template <typename in_t, typename out_t>
struct ElementwiseParams {
  const in_t* __restrict__ in;
  out_t* __restrict__ out;
  int64_t n;
  MuLawConsts c;
};

template <typename scalar_t>
__global__ void mu_law_encode_kernel(ElementwiseParams<scalar_t, int64_t> p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    p.out[i] = mu_law_encode_one(static_cast<double>(p.in[i]), p.c);
  }
}

template <typename scalar_t>
__global__ void mu_law_decode_kernel(ElementwiseParams<scalar_t, float> p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    p.out[i] = mu_law_decode_one(static_cast<int64_t>(p.in[i]), p.c);
  }
}

unsigned int num_blocks(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

void check_cuda(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.is_cuda(), op, ": ", arg, " must be a CUDA tensor, got device ", t.device());
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
    ElementwiseParams<scalar_t, int64_t> p{xc.const_data_ptr<scalar_t>(), out.data_ptr<int64_t>(), n,
                                           mu_law_consts(n_quant)};
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
    ElementwiseParams<scalar_t, float> p{qc.const_data_ptr<scalar_t>(), out.data_ptr<float>(), n,
                                         mu_law_consts(n_quant)};
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
