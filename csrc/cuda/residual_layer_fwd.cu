// Fused WaveNet residual layer, CUDA forward (csrc/residual_layer.h has the math and the layout).
//   h      = W_in [x taps; lc]                 one batched cuBLAS GEMM; h is what the backward keeps
//   z      = tanh(h_a + c_a) sigmoid(h_b + c_b) one elementwise kernel (c = b_dil + W_gc g, float32)
//   O      = [W_res; W_skip] z                  one batched GEMM, float32 output
//   x_out  = x (current tap) + b_res + O_res;  skip = b_skip + O_skip     one epilogue kernel
// z lives only between the two GEMMs (cuBLAS needs it in memory); the backward recomputes it from h.
// Elementwise math in float32 for every storage type (float32, bfloat16, float16).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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
__global__ void gate_fwd_kernel(residual::GateParams<T> p) {
  WN_GRID_STRIDE_LOOP(i, p.total) {
    const residual::GateAt g = residual::gate_at(p.h, p.cb, i, p.nd, p.nc);
    p.z[i] = static_cast<T>(g.a * g.s);
  }
}

template <typename T>
struct EpilogueParams {
  const float* __restrict__ o;    // (B, n_o, nc): [res rows (n_res_rows); skip rows (ns)]
  const T* __restrict__ x;        // input, last-dim contiguous: strides sx0, sx1
  const T* __restrict__ b_res;    // (nr) or null
  const T* __restrict__ b_skip;   // (ns) or null
  T* __restrict__ x_out;          // (B, nr, n) or null
  T* __restrict__ skip;           // (B, ns, n_out)
  int64_t sx0, sx1, x_shift;      // x_shift = (K-1) d
  int64_t nr, ns, n_res_rows, n_o, nc, n, n_out, cs;
  int64_t n_x, total;             // elements of x_out (0 without it); of x_out and skip together
};

// O = [W_res; W_skip] z (float32, (B, n_o, nc)); x_out empty without a residual output.
template <typename T>
EpilogueParams<T> set_epilogue_params(const Geom& G, const at::Tensor& O, const at::Tensor& x, const Opt& b_res,
                                      const Opt& b_skip, at::Tensor& x_out, at::Tensor& skip) {
  EpilogueParams<T> p{};
  p.o = O.const_data_ptr<float>();
  p.x = x.const_data_ptr<T>();
  p.b_res = residual::present(b_res) ? b_res->const_data_ptr<T>() : nullptr;
  p.b_skip = residual::present(b_skip) ? b_skip->const_data_ptr<T>() : nullptr;
  p.x_out = G.has_res ? x_out.data_ptr<T>() : nullptr;
  p.skip = skip.data_ptr<T>();
  p.sx0 = x.stride(0);
  p.sx1 = x.stride(1);
  p.x_shift = (G.K - 1) * G.d;
  p.nr = G.nr;
  p.ns = G.ns;
  p.n_res_rows = G.has_res ? G.nr : 0;
  p.n_o = p.n_res_rows + G.ns;
  p.nc = G.nc;
  p.n = G.n;
  p.n_out = G.n_out;
  p.cs = G.cs;
  p.n_x = G.has_res ? G.B * G.nr * G.n : 0;
  p.total = p.n_x + G.B * G.ns * G.n_out;
  return p;
}

// One thread per output element of x_out (if any) followed by skip.
template <typename T>
__global__ void epilogue_kernel(EpilogueParams<T> p) {
  WN_GRID_STRIDE_LOOP(i, p.total) {
    if (i < p.n_x) {  // c0 = 0 with a residual output, so column t of O is x_out column t
      const int64_t t = i % p.n, br = i / p.n, r = br % p.nr, b = br / p.nr;
      float v = static_cast<float>(p.x[b * p.sx0 + r * p.sx1 + p.x_shift + t]) + p.o[(b * p.n_o + r) * p.nc + t];
      if (p.b_res) v += static_cast<float>(p.b_res[r]);
      p.x_out[i] = static_cast<T>(v);
    } else {
      const int64_t j = i - p.n_x;
      const int64_t t = j % p.n_out, bs = j / p.n_out, s = bs % p.ns, b = bs / p.ns;
      float v = p.o[(b * p.n_o + p.n_res_rows + s) * p.nc + p.cs + t];
      if (p.b_skip) v += static_cast<float>(p.b_skip[s]);
      p.skip[j] = static_cast<T>(v);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_layer_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& lc_, const at::Tensor& g, const at::Tensor& w_dil, const Opt& b_dil,
    const at::Tensor& w_lc, const at::Tensor& w_gc, const Opt& w_res, const Opt& b_res, const at::Tensor& w_skip,
    const Opt& b_skip, int64_t dilation, int64_t n_out) {
  constexpr const char* op = residual::kFwdOp;
  launch::check_cuda(x_, op, "x");
  residual::check_cuda_dtype(x_, op);
  const Geom G = residual::check_args(op, x_, lc_, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip,
                                      dilation, n_out);
  const c10::cuda::CUDAGuard device_guard(x_.device());
  const at::Tensor x = residual::rows_contiguous(x_);
  const at::Tensor lc = residual::rows_contiguous(lc_);
  const at::TensorOptions o = x.options();

  const at::Tensor Win = residual::batched(residual::input_matrix(w_dil, w_lc), G.B);        // (B, 2nd, Kc)
  const at::Tensor Wout = residual::batched(residual::output_matrix(G, w_res, w_skip), G.B);  // (B, n_o, nd)
  const at::Tensor cb = residual::gate_bias32(g, w_gc, b_dil);                                 // (B, 2nd) f32
  const at::Tensor h = at::bmm(Win, residual::gather_input(G, x, lc));                        // (B, 2nd, nc)
  at::Tensor z = at::empty({G.B, G.nd, G.nc}, o);
  at::Tensor x_out = G.has_res ? at::empty({G.B, G.nr, G.n}, o) : at::empty({0}, o);
  at::Tensor skip = at::empty({G.B, G.ns, G.n_out}, o);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "residual_layer_fwd_cuda", [&] {
    using T = scalar_t;
    const auto gp = residual::set_gate_params<T>(G, h, cb, z);
    gate_fwd_kernel<T><<<num_blocks(gp.total), kThreads, 0, stream>>>(gp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor O = residual::bmm32(Wout, z);  // (B, n_o, nc) f32
    const auto ep = set_epilogue_params<T>(G, O, x, b_res, b_skip, x_out, skip);
    epilogue_kernel<T><<<num_blocks(ep.total), kThreads, 0, stream>>>(ep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_out, skip, h};
}

}  // namespace

TORCH_LIBRARY_IMPL(wavenet_ae, CUDA, m) { m.impl("residual_layer_fwd", &residual_layer_fwd_cuda); }

}  // namespace wavenet_ae
