// Host-side argument checks of wavenet_ae::wavenet_generate, shared by the CPU and CUDA entry points:
// every message names the argument and the shape it should have. check_problem reads only shapes,
// dtypes and devices (never tensor data, so never a GPU sync); the class values in x_prev and forced
// are checked by check_classes: on the host by the CPU engine, by a small kernel ahead of the
// generation kernel on the GPU (csrc/cuda/wavenet_generate.cu), both raising with fail_on_bad_classes.
// make_params / make_chunk fill the kernels' gen::Params and gen::Chunk (pointers into the tensors)
// from the packed weights; see csrc/wavenet_step.h for the layout and
// wavenet_ae/ops/wavenet_generate.py:wavenet_generate for the Python side.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "wavenet_step.h"

namespace wavenet_ae {
namespace gen {

constexpr const char* kGenerateOp = "wavenet_ae::wavenet_generate";

struct Problem {
  Dims dims;
  int64_t B = 0, S = 0;
  int64_t q_rows = 0;
  int dil[kMaxLayers];
  int64_t qoff[kMaxLayers];
};

inline void check_tensor(const at::Tensor& t, const char* arg, int64_t dim, at::ScalarType dtype,
                         const c10::Device& dev) {
  TORCH_CHECK(t.defined(), kGenerateOp, ": ", arg, " is undefined");
  TORCH_CHECK(t.device() == dev, kGenerateOp, ": ", arg, " must be on ", dev, " (like cond), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, kGenerateOp, ": ", arg, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, kGenerateOp, ": ", arg, " must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kGenerateOp, ": ", arg, " must be contiguous");
}

inline void check_shape(const at::Tensor& t, const char* arg, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, kGenerateOp, ": ", arg, " must have shape ", want, ", got ", t.sizes());
}

// Checks everything; `wdtype` is the dtype of the four weight matrices (embed and biases are float32).
inline Problem check_problem(const at::Tensor& embed, const at::Tensor& w_dil, const at::Tensor& w_out,
                             const at::Tensor& b_out, const at::Tensor& w_post1, const at::Tensor& b_post1,
                             const at::Tensor& w_post2, const at::Tensor& b_post2, at::IntArrayRef dilations,
                             const at::Tensor& cond, const at::Tensor& u, const std::optional<at::Tensor>& forced,
                             const at::Tensor& queues, const at::Tensor& x_prev, int64_t t0) {
  const c10::Device dev = cond.device();
  const at::ScalarType wdtype = w_dil.scalar_type();
  TORCH_CHECK(wdtype == at::kFloat || wdtype == at::kHalf || wdtype == at::kBFloat16, kGenerateOp,
              ": weight matrices must be float32, float16 or bfloat16, got ", wdtype);
  check_tensor(cond, "cond", 3, at::kFloat, dev);
  check_tensor(embed, "embed", 2, at::kFloat, dev);
  check_tensor(w_dil, "w_dil", 4, wdtype, dev);
  check_tensor(w_out, "w_out", 3, wdtype, dev);
  check_tensor(b_out, "b_out", 2, at::kFloat, dev);
  check_tensor(w_post1, "w_post1", 2, wdtype, dev);
  check_tensor(b_post1, "b_post1", 1, at::kFloat, dev);
  check_tensor(w_post2, "w_post2", 2, wdtype, dev);
  check_tensor(b_post2, "b_post2", 1, at::kFloat, dev);
  TORCH_CHECK(t0 >= 0, kGenerateOp, ": t0 must be >= 0, got ", t0);

  Problem pr;
  Dims& D = pr.dims;
  D.n_quant = (int)embed.size(0);
  D.n_res = (int)embed.size(1);
  D.n_layers = (int)w_dil.size(0);
  D.n_kern = (int)w_dil.size(1);
  D.n_dil = (int)(w_dil.size(3) / 2);
  D.n_skp = (int)(w_out.size(2) - D.n_res);
  D.n_post = (int)w_post1.size(1);
  TORCH_CHECK(D.n_layers >= 1 && D.n_layers <= kMaxLayers, kGenerateOp, ": 1..", kMaxLayers,
              " layers supported, got w_dil of shape ", w_dil.sizes());
  TORCH_CHECK(D.n_kern >= 2 && D.n_kern <= kMaxKern, kGenerateOp, ": n_kern (w_dil.size(1)) must be in [2, ",
              kMaxKern, "], got ", D.n_kern);
  TORCH_CHECK(D.n_res >= 1 && D.n_dil >= 1 && w_dil.size(3) % 2 == 0, kGenerateOp,
              ": w_dil must be (L, K, n_res, 2 n_dil), got ", w_dil.sizes());
  TORCH_CHECK(D.n_skp >= 1 && D.n_post >= 1 && D.n_quant >= 2, kGenerateOp,
              ": bad sizes: w_out ", w_out.sizes(), ", w_post1 ", w_post1.sizes(), ", embed ", embed.sizes());
  check_shape(w_dil, "w_dil", {D.n_layers, D.n_kern, D.n_res, 2 * D.n_dil});
  check_shape(w_out, "w_out", {D.n_layers, D.n_dil, D.n_res + D.n_skp});
  check_shape(b_out, "b_out", {D.n_layers, D.n_res + D.n_skp});
  check_shape(w_post1, "w_post1", {D.n_skp, D.n_post});
  check_shape(b_post1, "b_post1", {D.n_post});
  check_shape(w_post2, "w_post2", {D.n_post, D.n_quant});
  check_shape(b_post2, "b_post2", {D.n_quant});
  TORCH_CHECK((int64_t)dilations.size() == D.n_layers, kGenerateOp, ": ", D.n_layers, " layers in w_dil but ",
              dilations.size(), " dilations");
  for (int l = 0; l < D.n_layers; ++l) {
    TORCH_CHECK(dilations[l] >= 1, kGenerateOp, ": dilations must be >= 1, got ", dilations);
    pr.dil[l] = (int)dilations[l];
    pr.qoff[l] = pr.q_rows;
    pr.q_rows += (int64_t)(D.n_kern - 1) * dilations[l];
  }

  pr.B = cond.size(0);
  pr.S = cond.size(1);
  TORCH_CHECK(cond.size(2) == D.cond_stride(), kGenerateOp, ": cond must be (B, S, n_layers * 2 n_dil = ",
              D.cond_stride(), "), got ", cond.sizes());
  check_tensor(u, "u", 2, at::kFloat, dev);
  check_shape(u, "u", {pr.B, pr.S});
  if (forced.has_value()) {
    check_tensor(*forced, "forced", 2, at::kLong, dev);
    check_shape(*forced, "forced", {pr.B, pr.S});
  }
  check_tensor(queues, "queues", 3, at::kFloat, dev);
  check_shape(queues, "queues", {pr.B, pr.q_rows, D.n_res});
  check_tensor(x_prev, "x_prev", 1, at::kLong, dev);
  check_shape(x_prev, "x_prev", {pr.B});
  return pr;
}

// What check_classes found wrong (a bit set; the CUDA check kernel ORs them into one int).
enum BadClasses : int {
  kClassesOk = 0,
  kBadForced = 1,  // a forced class >= n_quant
  kBadXPrev = 2,   // an x_prev class outside [0, n_quant)
};

// Raises for what `bad` (BadClasses bits) reports.
inline void fail_on_bad_classes(int bad, int64_t n_quant) {
  TORCH_CHECK(!(bad & kBadForced), kGenerateOp, ": forced classes must be < n_quant = ", n_quant,
              " (or negative to sample)");
  TORCH_CHECK(!(bad & kBadXPrev), kGenerateOp, ": x_prev classes must lie in [0, n_quant = ", n_quant, ")");
}

// The class values of host tensors that check_problem validated (CPU engine): read in place.
inline void check_classes(const Problem& pr, const std::optional<at::Tensor>& forced, const at::Tensor& x_prev) {
  const int64_t nq = pr.dims.n_quant;
  int bad = kClassesOk;
  if (forced.has_value()) {
    const int64_t* f = forced->const_data_ptr<int64_t>();
    for (int64_t i = 0, n = pr.B * pr.S; i < n; ++i) {
      if (f[i] >= nq) {
        bad |= kBadForced;
        break;
      }
    }
  }
  const int64_t* x = x_prev.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < pr.B; ++b) {
    if (x[b] < 0 || x[b] >= nq) {
      bad |= kBadXPrev;
      break;
    }
  }
  fail_on_bad_classes(bad, nq);
}

template <class WT>
Params<WT> make_params(const Problem& pr, const at::Tensor& embed, const at::Tensor& w_dil, const at::Tensor& w_out,
                       const at::Tensor& b_out, const at::Tensor& w_post1, const at::Tensor& b_post1,
                       const at::Tensor& w_post2, const at::Tensor& b_post2) {
  Params<WT> P;
  P.dims = pr.dims;
  P.embed = embed.const_data_ptr<float>();
  P.w_dil = reinterpret_cast<const WT*>(w_dil.const_data_ptr());
  P.w_out = reinterpret_cast<const WT*>(w_out.const_data_ptr());
  P.b_out = b_out.const_data_ptr<float>();
  P.w_post1 = reinterpret_cast<const WT*>(w_post1.const_data_ptr());
  P.b_post1 = b_post1.const_data_ptr<float>();
  P.w_post2 = reinterpret_cast<const WT*>(w_post2.const_data_ptr());
  P.b_post2 = b_post2.const_data_ptr<float>();
  for (int l = 0; l < kMaxLayers; ++l) {
    P.dil[l] = l < pr.dims.n_layers ? pr.dil[l] : 0;
    P.qoff[l] = l < pr.dims.n_layers ? pr.qoff[l] : 0;
  }
  P.q_rows = pr.q_rows;
  return P;
}

// Per-step pointers of one op call (one chunk).
struct Chunk {
  const float* cond;
  const float* u;
  const int64_t* forced;  // nullable
  float* queues;
  int64_t* x_prev;
  int64_t* samples;
  float* logits;  // nullable
  int64_t S, t0;
};

// The chunk of one op call, on the tensors check_problem validated (both engines' host code).
inline Chunk make_chunk(const at::Tensor& cond, const at::Tensor& u, const std::optional<at::Tensor>& forced,
                        at::Tensor& queues, at::Tensor& x_prev, at::Tensor& samples, at::Tensor& logits,
                        bool want_logits, int64_t S, int64_t t0) {
  Chunk c;
  c.cond = cond.const_data_ptr<float>();
  c.u = u.const_data_ptr<float>();
  c.forced = forced.has_value() ? forced->const_data_ptr<int64_t>() : nullptr;
  c.queues = queues.data_ptr<float>();
  c.x_prev = x_prev.data_ptr<int64_t>();
  c.samples = samples.data_ptr<int64_t>();
  c.logits = want_logits ? logits.data_ptr<float>() : nullptr;
  c.S = S;
  c.t0 = t0;
  return c;
}

}  // namespace gen
}  // namespace wavenet_ae
