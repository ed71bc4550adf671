// Fused WaveNet residual layer, CUDA backward (csrc/residual_layer.h has the math; residual_layer_fwd.cu
// the forward).
//   G_out = [g_xout; g_skip]                      (B, n_o, nc), zeros where a column feeds no output
//   g_z   = [W_res; W_skip]^T G_out               one batched GEMM, float32
//   z, g_h from h (recomputed tanh/sigmoid)        one elementwise kernel
//   weight gradients: [W_res; W_skip] <- G_out z^T, W_in <- g_h X^T (batched GEMMs summed over the
//   batch in float32), biases and W_gc from row sums of G_out and g_h
//   P = W_in^T g_h                                 one batched GEMM, float32
//   g_x = g_xout (shifted) + sum_k P_k (shifted), g_lc = P_lc (right-aligned)   one kernel each
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "cuda/residual_layer_cuda.h"

namespace wavenet_ae {
namespace {

using launch::kThreads;
using launch::num_blocks;
using residual::Geom;
using Opt = std::optional<at::Tensor>;

template <typename T>
struct GateBwdParams {
  residual::GateParams<T> g;      // h, c, z (recomputed), sizes
  const float* __restrict__ gz;   // (B, nd, nc)
  T* __restrict__ gh;             // (B, 2nd, nc)
};

template <typename T>
GateBwdParams<T> set_gate_bwd_params(const Geom& G, const at::Tensor& h, const at::Tensor& cb, const at::Tensor& gz,
                                     at::Tensor& z, at::Tensor& gh) {
  GateBwdParams<T> p{};
  p.g = residual::set_gate_params<T>(G, h, cb, z);
  p.gz = gz.const_data_ptr<float>();
  p.gh = gh.data_ptr<T>();
  return p;
}

template <typename T>
__global__ void gate_bwd_kernel(GateBwdParams<T> p) {
  WN_GRID_STRIDE_LOOP(i, p.g.total) {
    const residual::GateAt g = residual::gate_at(p.g.h, p.g.cb, i, p.g.nd, p.g.nc);
    const float gs = p.gz[i] * g.s;
    p.g.z[i] = static_cast<T>(g.a * g.s);
    p.gh[g.ia] = static_cast<T>(gs * (1.f - g.a * g.a));
    p.gh[g.ib] = static_cast<T>(gs * g.a * (1.f - g.s));
  }
}

template <typename T>
struct InputGradParams {
  const float* __restrict__ P;    // (B, p_rows, nc): rows [x taps (K nr) if need_x][lc (nlc) if need_lc]
  const T* __restrict__ gxo;      // (B, nr, n) contiguous, or null
  T* __restrict__ gx;             // (B, nr, L) or null
  T* __restrict__ glc;            // (B, nlc, Llc) or null
  int64_t p_rows, lc_row;         // lc_row: first lc row of P
  int64_t nr, nlc, K, d, L, Llc, n, nc, c0, lc_off;
  int64_t n_x, total;             // elements of g_x (0 if not asked for); of g_x and g_lc together
};

// P = W_in^T g_h over rows [p_lo, p_lo + p_rows) of [x taps (K nr); lc (nlc)] (float32); gxo: the residual
// output's gradient (contiguous) or undefined; g_x / g_lc: undefined or empty when not asked for.
template <typename T>
InputGradParams<T> set_input_grad_params(const Geom& G, const at::Tensor& P, int64_t p_lo, const at::Tensor& gxo,
                                         at::Tensor& g_x, at::Tensor& g_lc, bool need_x, bool need_lc) {
  InputGradParams<T> p{};
  p.P = P.const_data_ptr<float>();
  p.gxo = gxo.defined() ? gxo.const_data_ptr<T>() : nullptr;
  p.gx = need_x ? g_x.data_ptr<T>() : nullptr;
  p.glc = need_lc ? g_lc.data_ptr<T>() : nullptr;
  p.p_rows = P.size(1);
  p.lc_row = G.K * G.nr - p_lo;
  p.nr = G.nr;
  p.nlc = G.nlc;
  p.K = G.K;
  p.d = G.d;
  p.L = G.L;
  p.Llc = G.Llc;
  p.n = G.n;
  p.nc = G.nc;
  p.c0 = G.c0;
  p.lc_off = G.lc_off;
  p.n_x = need_x ? G.B * G.nr * G.L : 0;
  p.total = p.n_x + (need_lc ? G.B * G.nlc * G.Llc : 0);
  return p;
}

// g_x[b, r, u] = g_xout[b, r, u - (K-1) d] + sum_k P[b, k nr + r, u - k d - c0];  then
// g_lc[b, r, u] = P[b, lc_row + r, u - lc_off]   (terms outside their range are 0).
template <typename T>
__global__ void input_grad_kernel(InputGradParams<T> p) {
  WN_GRID_STRIDE_LOOP(i, p.total) {
    if (i < p.n_x) {
      const int64_t u = i % p.L, br = i / p.L, r = br % p.nr, b = br / p.nr;
      float v = 0.f;
      const int64_t tr = u - (p.K - 1) * p.d;
      if (p.gxo && tr >= 0) v += static_cast<float>(p.gxo[(b * p.nr + r) * p.n + tr]);
      for (int64_t k = 0; k < p.K; ++k) {
        const int64_t t = u - k * p.d - p.c0;
        if (t >= 0 && t < p.nc) v += p.P[(b * p.p_rows + k * p.nr + r) * p.nc + t];
      }
      p.gx[i] = static_cast<T>(v);
    } else {
      const int64_t j = i - p.n_x;
      const int64_t u = j % p.Llc, br = j / p.Llc, r = br % p.nlc, b = br / p.nlc;
      const int64_t t = u - p.lc_off;
      p.glc[j] = static_cast<T>(t >= 0 ? p.P[(b * p.p_rows + p.lc_row + r) * p.nc + t] : 0.f);
    }
  }
}

std::vector<at::Tensor> residual_layer_bwd_cuda(
    const Opt& grad_x_out, const at::Tensor& grad_skip, const at::Tensor& x_, const at::Tensor& lc_,
    const at::Tensor& g, const at::Tensor& saved, const at::Tensor& w_dil, const Opt& b_dil, const at::Tensor& w_lc,
    const at::Tensor& w_gc, const Opt& w_res, const Opt& b_res, const at::Tensor& w_skip, const Opt& b_skip,
    int64_t dilation, int64_t n_out, bool need_x, bool need_lc, bool need_g) {
  constexpr const char* op = residual::kBwdOp;
  launch::check_cuda(x_, op, "x");
  residual::check_cuda_dtype(x_, op);
  const Geom G = residual::check_args(op, x_, lc_, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip,
                                      dilation, n_out);
  const bool have_gxo = residual::check_grads(op, G, saved, grad_x_out, grad_skip, x_);
  const c10::cuda::CUDAGuard device_guard(x_.device());
  const at::Tensor x = residual::rows_contiguous(x_);
  const at::Tensor lc = residual::rows_contiguous(lc_);
  const at::Tensor h = saved.contiguous();
  const at::TensorOptions o = x.options();
  const at::ScalarType dt = x.scalar_type();
  const int64_t nd2 = 2 * G.nd, Knr = G.K * G.nr, n_res_rows = G.has_res ? G.nr : 0, n_o = n_res_rows + G.ns;
  const int64_t p_lo = need_x ? 0 : Knr, p_hi = need_lc ? G.kc() : Knr, p_rows = std::max<int64_t>(0, p_hi - p_lo);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor Win = residual::input_matrix(w_dil, w_lc);          // (2nd, Kc)
  const at::Tensor Wout = residual::output_matrix(G, w_res, w_skip);   // (n_o, nd)
  const at::Tensor cb = residual::gate_bias32(g, w_gc, b_dil);         // (B, 2nd) f32

  // G_out = [g_xout; g_skip] over the computed columns
  at::Tensor Go = at::empty({G.B, n_o, G.nc}, o);
  if (G.has_res) {
    if (have_gxo) Go.narrow(1, 0, G.nr).copy_(*grad_x_out);
    else Go.narrow(1, 0, G.nr).zero_();
  }
  if (G.cs > 0) Go.narrow(1, n_res_rows, G.ns).narrow(2, 0, G.cs).zero_();
  Go.narrow(1, n_res_rows, G.ns).narrow(2, G.cs, G.n_out).copy_(grad_skip);

  const at::Tensor gz = residual::bmm32(residual::batched(Wout.t(), G.B), Go);  // (B, nd, nc) f32
  at::Tensor z = at::empty({G.B, G.nd, G.nc}, o);
  at::Tensor gh = at::empty({G.B, nd2, G.nc}, o);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "residual_layer_bwd_cuda_gate", [&] {
    using T = scalar_t;
    const auto p = set_gate_bwd_params<T>(G, h, cb, gz, z, gh);
    gate_bwd_kernel<T><<<num_blocks(p.g.total), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // weight and bias gradients (float32, cast to the weights' dtype at the end)
  const at::Tensor ghsum = at::sum(gh, {2}, false, at::kFloat);                          // (B, 2nd)
  const at::Tensor gWo = residual::bmm32(Go, z.transpose(1, 2)).sum(0);                   // (n_o, nd)
  const at::Tensor gbo = at::sum(Go, {0, 2}, false, at::kFloat);                          // (n_o)
  const at::Tensor gWin = residual::bmm32(gh, residual::gather_input(G, x, lc).transpose(1, 2)).sum(0);  // (2nd, Kc)
  at::Tensor g_w_dil = gWin.narrow(1, 0, Knr).reshape({nd2, G.K, G.nr}).permute({0, 2, 1}).to(dt).contiguous();
  at::Tensor g_w_lc = gWin.narrow(1, Knr, G.nlc).to(dt).contiguous().view({nd2, G.nlc, 1});
  at::Tensor g_w_gc = at::mm(ghsum.t(), g.to(at::kFloat)).to(dt);
  at::Tensor g_b_dil = residual::present(b_dil) ? ghsum.sum(0).to(dt) : at::empty({0}, o);
  at::Tensor g_g = need_g ? at::mm(ghsum, w_gc.to(at::kFloat)).to(dt) : at::empty({0}, o);
  at::Tensor g_w_res = G.has_res ? gWo.narrow(0, 0, G.nr).to(dt).contiguous().view({G.nr, G.nd, 1}) : at::empty({0}, o);
  at::Tensor g_b_res = residual::present(b_res) ? gbo.narrow(0, 0, G.nr).to(dt).contiguous() : at::empty({0}, o);
  at::Tensor g_w_skip = gWo.narrow(0, n_res_rows, G.ns).to(dt).contiguous().view({G.ns, G.nd, 1});
  at::Tensor g_b_skip = residual::present(b_skip) ? gbo.narrow(0, n_res_rows, G.ns).to(dt).contiguous() : at::empty({0}, o);

  // input gradients
  at::Tensor g_x = need_x ? at::empty({G.B, G.nr, G.L}, o) : at::empty({0}, o);
  at::Tensor g_lc = need_lc ? at::empty({G.B, G.nlc, G.Llc}, o) : at::empty({0}, o);
  if (p_rows > 0) {
    const at::Tensor WinT = residual::batched(Win.narrow(1, p_lo, p_rows).t(), G.B);  // (B, p_rows, 2nd)
    const at::Tensor P = residual::bmm32(WinT, gh);                                   // (B, p_rows, nc) f32
    const at::Tensor gxo = have_gxo ? grad_x_out->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "residual_layer_bwd_cuda_inputs", [&] {
      using T = scalar_t;
      const auto p = set_input_grad_params<T>(G, P, p_lo, gxo, g_x, g_lc, need_x, need_lc);
      input_grad_kernel<T><<<num_blocks(p.total), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {g_x, g_lc, g_g, g_w_dil, g_b_dil, g_w_lc, g_w_gc, g_w_res, g_b_res, g_w_skip, g_b_skip};
}

}  // namespace

TORCH_LIBRARY_IMPL(wavenet_ae, CUDA, m) { m.impl("residual_layer_bwd", &residual_layer_bwd_cuda); }

}  // namespace wavenet_ae
