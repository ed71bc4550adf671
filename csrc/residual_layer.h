// One gated dilated causal residual layer of the WaveNet decoder, fused (forward and backward):
// geometry and argument checks shared by the CPU kernel (csrc/cpu/residual_layer.cpp) and the CUDA
// kernels (csrc/cuda/residual_layer_fwd.cu, residual_layer_bwd.cu). The reference is
// wavenet_ae/ops/residual_layer.py:residual_layer_ref.
//
// Math (all tensors (batch, channels, time); K taps, dilation d, n = L - (K-1) d output steps):
//   h[:, t]   = b_dil + W_gc g + sum_k W_k x[:, t + k d] + W_lc lc[:, Llc - n + t]     (2 n_dil)
//   a, s      = tanh(h[:n_dil]), sigmoid(h[n_dil:]);   z = a * s                          (n_dil)
//   x_out[:, t] = x[:, t + (K-1) d] + b_res + W_res z[:, t]        (absent in the last layer)
//   skip[:, j]  = b_skip + W_skip z[:, n - n_out + j]               (j < n_out)
// The last layer (no W_res) only needs z at its last n_out steps, so every kernel works on the
// "computed columns" t in [c0, n): c0 = 0 with a residual output, n - n_out without.
//
// `saved` (returned by the forward, consumed by the backward, same shape on every device but
// device-specific content): CPU [a; s] (tanh and sigmoid values), CUDA h without b_dil + W_gc g.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <optional>

namespace wavenet_ae {
namespace residual {

constexpr const char* kFwdOp = "wavenet_ae::residual_layer_fwd";
constexpr const char* kBwdOp = "wavenet_ae::residual_layer_bwd";

struct Geom {
  int64_t B, nr, nd, ns, nlc, ng, K, d;
  int64_t L;       // input length
  int64_t Llc;     // conditioning length (>= n; the last n steps are used)
  int64_t n;       // output length of the layer
  int64_t n_out;   // skip length (the last n_out of the n steps)
  int64_t c0;      // first computed column (0, or n - n_out without a residual output)
  int64_t nc;      // computed columns n - c0
  int64_t cs;      // first computed column (relative to c0) that feeds the skip output
  int64_t lc_off;  // lc column of computed column 0: Llc - n + c0
  bool has_res;
  int64_t ng2() const { return 2 * nd; }
  int64_t kc() const { return K * nr + nlc; }  // rows of the concatenated input [x taps; lc]
};

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_same(const at::Tensor& t, const at::Tensor& x, const char* op, const char* arg) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", arg, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", arg, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type(), " (all inputs and weights must share one dtype)");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* op, const char* arg) {
  TORCH_CHECK(t.sizes() == want, op, ": ", arg, " must have shape ", want, ", got ", t.sizes());
}

// Validates every argument (names the argument and the shapes in the message) and returns the geometry.
inline Geom check_args(const char* op, const at::Tensor& x, const at::Tensor& lc, const at::Tensor& g,
                       const at::Tensor& w_dil, const std::optional<at::Tensor>& b_dil, const at::Tensor& w_lc,
                       const at::Tensor& w_gc, const std::optional<at::Tensor>& w_res,
                       const std::optional<at::Tensor>& b_res, const at::Tensor& w_skip,
                       const std::optional<at::Tensor>& b_skip, int64_t dilation, int64_t n_out) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (batch, n_res, time), got shape ", x.sizes());
  TORCH_CHECK(w_dil.dim() == 3, op, ": w_dil must be (2 n_dil, n_res, n_kern), got shape ", w_dil.sizes());
  TORCH_CHECK(dilation >= 1, op, ": dilation must be >= 1, got ", dilation);
  Geom G{};
  G.B = x.size(0);
  G.nr = x.size(1);
  G.L = x.size(2);
  G.K = w_dil.size(2);
  G.d = dilation;
  TORCH_CHECK(w_dil.size(0) % 2 == 0 && w_dil.size(0) > 0, op, ": w_dil.shape[0] = 2 n_dil must be even, got ",
              w_dil.size(0));
  G.nd = w_dil.size(0) / 2;
  TORCH_CHECK(w_dil.size(1) == G.nr, op, ": w_dil must be (2 n_dil, n_res=", G.nr, ", n_kern), got ", w_dil.sizes());
  TORCH_CHECK(G.K >= 1, op, ": w_dil has no taps");
  G.n = G.L - (G.K - 1) * G.d;
  TORCH_CHECK(G.n > 0, op, ": input of ", G.L, " steps is too short for ", G.K, " taps at dilation ", G.d,
              " (needs more than ", (G.K - 1) * G.d, " steps)");
  TORCH_CHECK(n_out >= 1 && n_out <= G.n, op, ": n_out must be in [1, ", G.n, "] (the layer's output length), got ",
              n_out);
  G.n_out = n_out;
  TORCH_CHECK(lc.dim() == 3 && lc.size(0) == G.B, op, ": lc must be (batch=", G.B, ", n_lc, time), got shape ",
              lc.sizes());
  G.nlc = lc.size(1);
  G.Llc = lc.size(2);
  TORCH_CHECK(G.Llc >= G.n, op, ": lc has ", G.Llc, " steps but the layer outputs ", G.n);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == G.B, op, ": g must be (batch=", G.B, ", n_global), got shape ", g.sizes());
  G.ng = g.size(1);
  TORCH_CHECK(w_skip.dim() == 3 && w_skip.size(1) == G.nd && w_skip.size(2) == 1, op,
              ": w_skip must be (n_skp, n_dil=", G.nd, ", 1), got shape ", w_skip.sizes());
  G.ns = w_skip.size(0);
  check_shape(w_lc, {2 * G.nd, G.nlc, 1}, op, "w_lc");
  check_shape(w_gc, {2 * G.nd, G.ng}, op, "w_gc");
  if (present(b_dil)) check_shape(*b_dil, {2 * G.nd}, op, "b_dil");
  G.has_res = present(w_res);
  if (G.has_res) check_shape(*w_res, {G.nr, G.nd, 1}, op, "w_res");
  if (present(b_res)) {
    TORCH_CHECK(G.has_res, op, ": b_res given without w_res");
    check_shape(*b_res, {G.nr}, op, "b_res");
  }
  if (present(b_skip)) check_shape(*b_skip, {G.ns}, op, "b_skip");
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&lc, "lc"}, {&g, "g"}, {&w_dil, "w_dil"},
                         {&w_lc, "w_lc"}, {&w_gc, "w_gc"}, {&w_skip, "w_skip"}}) {
    check_same(*t, x, op, name);
  }
  if (present(b_dil)) check_same(*b_dil, x, op, "b_dil");
  if (G.has_res) check_same(*w_res, x, op, "w_res");
  if (present(b_res)) check_same(*b_res, x, op, "b_res");
  if (present(b_skip)) check_same(*b_skip, x, op, "b_skip");
  G.c0 = G.has_res ? 0 : G.n - G.n_out;
  G.nc = G.n - G.c0;
  G.cs = G.n - G.n_out - G.c0;
  G.lc_off = G.Llc - G.n + G.c0;
  return G;
}

inline void check_saved(const char* op, const Geom& G, const at::Tensor& saved, const at::Tensor& x) {
  check_shape(saved, {G.B, 2 * G.nd, G.nc}, op, "saved");
  check_same(saved, x, op, "saved");
}

// Checks the backward's extra arguments; returns whether a residual-output gradient is given.
inline bool check_grads(const char* op, const Geom& G, const at::Tensor& saved,
                        const std::optional<at::Tensor>& grad_x_out, const at::Tensor& grad_skip, const at::Tensor& x) {
  check_saved(op, G, saved, x);
  check_shape(grad_skip, {G.B, G.ns, G.n_out}, op, "grad_skip");
  check_same(grad_skip, x, op, "grad_skip");
  const bool have = G.has_res && present(grad_x_out) && grad_x_out->numel() > 0;
  if (have) {
    check_shape(*grad_x_out, {G.B, G.nr, G.n}, op, "grad_x_out");
    check_same(*grad_x_out, x, op, "grad_x_out");
  }
  return have;
}

// Last dimension unit-stride (a BLAS-compatible view), copying only when needed.
inline at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// [W_0 | ... | W_{K-1} | W_lc]: the (2nd, K nr + n_lc) matrix that multiplies the concatenated input
// [x(t + 0 d); ...; x(t + (K-1) d); lc(t)].
inline at::Tensor input_matrix(const at::Tensor& w_dil, const at::Tensor& w_lc) {
  const int64_t nd2 = w_dil.size(0), nr = w_dil.size(1), K = w_dil.size(2), nlc = w_lc.size(1);
  at::Tensor W = at::empty({nd2, K * nr + nlc}, w_dil.options());
  W.narrow(1, 0, K * nr).view({nd2, K, nr}).copy_(w_dil.permute({0, 2, 1}));
  W.narrow(1, K * nr, nlc).copy_(w_lc.view({nd2, nlc}));
  return W;
}

// [W_res; W_skip]: the (n_res + n_skp, n_dil) matrix of the two 1x1 outputs (just W_skip without W_res).
inline at::Tensor output_matrix(const Geom& G, const std::optional<at::Tensor>& w_res, const at::Tensor& w_skip) {
  const at::Tensor Ws = w_skip.view({G.ns, G.nd});
  if (!G.has_res) return Ws.contiguous();
  at::Tensor W = at::empty({G.nr + G.ns, G.nd}, w_skip.options());
  W.narrow(0, 0, G.nr).copy_(w_res->view({G.nr, G.nd}));
  W.narrow(0, G.nr, G.ns).copy_(Ws);
  return W;
}

}  // namespace residual
}  // namespace wavenet_ae
