// Host helpers shared by the fused residual-layer CUDA kernels (residual_fwd.cu, residual_bwd.cu).
// Matrix products are ATen batched GEMMs (cuBLAS); csrc/residual.h has the math and the geometry.
#pragma once

#include <algorithm>

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include "residual.h"

namespace wavenet_ae {
namespace residual {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest

inline unsigned int num_blocks(int64_t n) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

inline void check_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors, got x on ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": the CUDA kernels support float32, bfloat16 and float16, got ", dt);
}

// Batched product with float32 results: cuBLAS accumulates in float32 either way; for bf16/fp16 inputs
// this also keeps the output in float32 (one rounding less before the elementwise kernels).
inline at::Tensor bmm32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::bmm(a, b) : at::bmm(a, b, at::kFloat);
}

// A weight matrix repeated over the batch (materialised: B small copies, plain strided-batched GEMMs).
inline at::Tensor batched(const at::Tensor& w, int64_t B) { return w.unsqueeze(0).expand({B, w.size(0), w.size(1)}).contiguous(); }

// b_dil + W_gc g in float32: (B, 2nd).
inline at::Tensor gate_bias32(const at::Tensor& g, const at::Tensor& w_gc, const std::optional<at::Tensor>& b_dil) {
  const at::Tensor g32 = g.to(at::kFloat), w32 = w_gc.to(at::kFloat);
  return (present(b_dil) ? at::addmm(b_dil->to(at::kFloat), g32, w32.t()) : at::mm(g32, w32.t())).contiguous();
}

// The concatenated input [x(t + 0 d); ...; x(t + (K-1) d); lc(t)] over the computed columns: (B, Kc, nc).
inline at::Tensor gather_input(const Geom& G, const at::Tensor& x, const at::Tensor& lc) {
  at::Tensor X = at::empty({G.B, G.kc(), G.nc}, x.options());
  for (int64_t k = 0; k < G.K; ++k) X.narrow(1, k * G.nr, G.nr).copy_(x.narrow(2, k * G.d + G.c0, G.nc));
  X.narrow(1, G.K * G.nr, G.nlc).copy_(lc.narrow(2, G.lc_off, G.nc));
  return X;
}

}  // namespace residual
}  // namespace wavenet_ae
