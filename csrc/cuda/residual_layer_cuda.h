// Host helpers shared by the fused residual-layer CUDA kernels (residual_layer_fwd.cu,
// residual_layer_bwd.cu). Matrix products are ATen batched GEMMs (cuBLAS); csrc/residual_layer.h has the
// math and the geometry; csrc/cuda/launch.cuh the launch helpers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include "cuda/launch.cuh"
#include "residual_layer.h"

namespace wavenet_ae {
namespace residual {

// x (the dtype of every input and weight) must be a type the CUDA kernels take; x's device is checked
// by launch::check_cuda.
inline void check_cuda_dtype(const at::Tensor& x, const char* op) {
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

// The gate's operands and output, filled once by set_gate_params (the forward's kernel takes them as they
// are; the backward's adds its gradients).
template <typename T>
struct GateParams {
  const T* __restrict__ h;        // (B, 2nd, nc) pre-activation without c
  const float* __restrict__ cb;   // (B, 2nd) c = b_dil + W_gc g
  T* __restrict__ z;              // (B, nd, nc)
  int64_t nd, nc, total;          // total = B nd nc
};

template <typename T>
GateParams<T> set_gate_params(const Geom& G, const at::Tensor& h, const at::Tensor& cb, at::Tensor& z) {
  GateParams<T> p{};
  p.h = h.const_data_ptr<T>();
  p.cb = cb.const_data_ptr<float>();
  p.z = z.data_ptr<T>();
  p.nd = G.nd;
  p.nc = G.nc;
  p.total = G.B * G.nd * G.nc;
  return p;
}

// The gate at element i of z (B, nd, nc): a = tanh(h_a + c_a), s = sigmoid(h_b + c_b), and the flat indices
// of h_a, h_b in h (B, 2nd, nc); c = cb (B, 2nd). One definition for the forward and for the backward,
// which recomputes z from h.
struct GateAt {
  int64_t ia, ib;
  float a, s;
};

template <typename T>
__device__ __forceinline__ GateAt gate_at(const T* __restrict__ h, const float* __restrict__ cb, int64_t i,
                                          int64_t nd, int64_t nc) {
  const int64_t t = i % nc, bc = i / nc, c = bc % nd, b = bc / nd;
  const int64_t ia = (b * 2 * nd + c) * nc + t, ib = ia + nd * nc;
  const float* cbb = cb + b * 2 * nd;
  return {ia, ib, tanhf(static_cast<float>(h[ia]) + cbb[c]),
          launch::sigmoidf(static_cast<float>(h[ib]) + cbb[nd + c])};
}

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
