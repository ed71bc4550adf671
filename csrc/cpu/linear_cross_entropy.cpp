// The decoder's output layer and its cross-entropy, fused (CPU): logits = W h + b over the classes,
// loss = sum over samples of logsumexp(logits) - logits[target], and the gradients of that sum,
// computed tile by tile while the tile's logits are in cache. Reference:
// wavenet_ae/ops/linear_cross_entropy.py:linear_cross_entropy_ref.
//
// The (B, n_quant, N) logits of a training step are 10 MB on the tiny preset and more on paper: the
// unfused head writes them, reads them for log_softmax, writes and reads the log-probabilities,
// zero-fills and scatters their gradient, and reads it back for the two products. Here a tile of
// kTile samples goes through all of it in L2, and the gradients (of the summed loss; the autograd
// function scales them by the upstream gradient / count) come out of the same pass, so the backward
// is a scaling: the logits are never stored nor recomputed.
//   per tile (item b, samples [t0, t0 + tw)):
//     L = W h[b][:, tile] + b                    one GEMM (n_quant x tw, row stride tw)
//     per sample: m = max L, s = sum exp(L - m), loss += m + log s - L[target]
//     G = softmax(L) - onehot(target)            in place in L;  g_b += row sums of G
//     g_h[b][:, tile] = W^T G,  g_W += G h^T      two GEMMs (g_W into per-thread accumulators,
//                                                 summed in a fixed order: no dependence on scheduling)
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "blas.h"
#include "chunks.h"
#include "cpu_paths.h"
#include "simd.h"

namespace wavenet_ae {
namespace {

using cpu::cpu_has_avx2;
using cpu::gemm;
using cpu::make_chunks;

// Samples per tile: the n_quant x kTile logits tile (128 KB for 256 classes) stays in L2.
constexpr int64_t kTile = 128;

// L (C x tw, row stride tw) replaced by exp(L - m) (m: column maxima); sum = its column sums.
template <typename T>
void exp_shifted_generic(T* L, int64_t C, int64_t tw, const T* m, T* sum) {
  std::fill(sum, sum + tw, T(0));
  for (int64_t c = 0; c < C; ++c) {
    T* r = L + c * tw;
    for (int64_t j = 0; j < tw; ++j) {
      r[j] = std::exp(r[j] - m[j]);
      sum[j] += r[j];
    }
  }
}

#if WN_HAVE_X86
WN_AVX2 void exp_shifted_avx2(float* L, int64_t C, int64_t tw, const float* m, float* sum) {
  std::fill(sum, sum + tw, 0.f);
  for (int64_t c = 0; c < C; ++c) {
    float* r = L + c * tw;
    int64_t j = 0;
    for (; j + 8 <= tw; j += 8) {
      const __m256 e = cpu::exp8(_mm256_sub_ps(_mm256_loadu_ps(r + j), _mm256_loadu_ps(m + j)));
      _mm256_storeu_ps(r + j, e);
      _mm256_storeu_ps(sum + j, _mm256_add_ps(_mm256_loadu_ps(sum + j), e));
    }
    for (; j < tw; ++j) {
      r[j] = std::exp(r[j] - m[j]);
      sum[j] += r[j];
    }
  }
}
#endif

template <typename T>
void exp_shifted(T* L, int64_t C, int64_t tw, const T* m, T* sum) {
#if WN_HAVE_X86
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) return exp_shifted_avx2(L, C, tw, m, sum);
  }
#endif
  exp_shifted_generic(L, C, tw, m, sum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& h_, const at::Tensor& w_, const std::optional<at::Tensor>& b_, const at::Tensor& target_,
    bool need_grad) {
  constexpr const char* op = "wavenet_ae::linear_cross_entropy";
  TORCH_CHECK(h_.dim() == 3 && w_.dim() == 2 && target_.dim() == 2, op,
              ": expected h (B, n_in, N), w (n_quant, n_in), target (B, N); got ", h_.sizes(), ", ", w_.sizes(),
              ", ", target_.sizes());
  const int64_t B = h_.size(0), Ci = h_.size(1), N = h_.size(2), C = w_.size(0);
  TORCH_CHECK(w_.size(1) == Ci, op, ": w has ", w_.size(1), " inputs, h has ", Ci, " channels");
  TORCH_CHECK(target_.size(0) == B && target_.size(1) == N, op, ": target ", target_.sizes(), " does not match h ",
              h_.sizes());
  TORCH_CHECK(target_.scalar_type() == at::kLong, op, ": target must be int64");
  TORCH_CHECK(h_.scalar_type() == at::kFloat || h_.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32 and float64, got ", h_.scalar_type());
  TORCH_CHECK(w_.scalar_type() == h_.scalar_type(), op, ": w and h must have the same dtype");
  const bool has_b = b_.has_value() && b_->defined();
  if (has_b) TORCH_CHECK(b_->dim() == 1 && b_->size(0) == C && b_->scalar_type() == h_.scalar_type(), op,
                         ": b must be (", C, ") of h's dtype");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor h = h_.stride(2) == 1 ? h_ : h_.contiguous();
  const at::Tensor w = w_.contiguous();
  const at::Tensor target = target_.contiguous();
  {
    const int64_t* tp = target.const_data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(tp, tp + target.numel());
    TORCH_CHECK(target.numel() == 0 || (*lo >= 0 && *hi < C), op, ": targets must lie in [0, ", C, "), got [",
                *lo, ", ", *hi, "]");
  }
  const at::TensorOptions o = h.options();
  const int64_t tiles_per_item = (N + kTile - 1) / kTile;
  const cpu::Chunks ch = make_chunks(B * tiles_per_item);
  // per chunk: [g_W (C x Ci) | g_b (C)] and its loss (double)
  const int64_t acc_len = need_grad ? C * Ci + C : 0;
  at::Tensor acc = at::zeros({ch.n, acc_len}, o);
  std::vector<double> loss_part(ch.n, 0.0);
  at::Tensor g_h = need_grad ? at::empty({B, Ci, N}, o) : at::empty({0}, o);

  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "linear_cross_entropy_cpu", [&] {
    using T = scalar_t;
    const T* wp = w.const_data_ptr<T>();
    const T* bp = has_b ? b_->const_data_ptr<T>() : nullptr;
    at::parallel_for(0, ch.n, 1, [&](int64_t c_begin, int64_t c_end) {
      at::AutoDispatchBelowADInplaceOrView below;
      at::Tensor lbuf = at::empty({C * kTile + 2 * kTile}, o);
      T* L = lbuf.data_ptr<T>();
      T* m = L + C * kTile;
      T* sum = m + kTile;
      for (int64_t k = c_begin; k < c_end; ++k) {
        T* gW = need_grad ? acc.data_ptr<T>() + k * acc_len : nullptr;
        T* gb = need_grad ? gW + C * Ci : nullptr;
        double loss = 0.0;
        for (int64_t u = ch.begin(k); u < ch.begin(k + 1); ++u) {
          const int64_t b = u / tiles_per_item, t0 = (u % tiles_per_item) * kTile, tw = std::min(kTile, N - t0);
          const T* ht = h.const_data_ptr<T>() + b * h.stride(0) + t0;
          const int64_t* tg = target.const_data_ptr<int64_t>() + b * N + t0;
          gemm<T>(false, false, C, tw, Ci, wp, Ci, ht, h.stride(1), T(0), L, tw);
          std::fill(m, m + tw, -std::numeric_limits<T>::infinity());
          for (int64_t c = 0; c < C; ++c) {
            T* r = L + c * tw;
            const T bias = bp ? bp[c] : T(0);
            for (int64_t j = 0; j < tw; ++j) {
              r[j] += bias;
              m[j] = std::max(m[j], r[j]);
            }
          }
          for (int64_t j = 0; j < tw; ++j) loss -= L[tg[j] * tw + j];
          exp_shifted<T>(L, C, tw, m, sum);
          for (int64_t j = 0; j < tw; ++j) loss += double(m[j]) + std::log(double(sum[j]));
          if (!need_grad) continue;
          for (int64_t j = 0; j < tw; ++j) sum[j] = T(1) / sum[j];
          for (int64_t c = 0; c < C; ++c) {
            T* r = L + c * tw;
            for (int64_t j = 0; j < tw; ++j) r[j] *= sum[j];
          }
          for (int64_t j = 0; j < tw; ++j) L[tg[j] * tw + j] -= T(1);
          for (int64_t c = 0; c < C; ++c) {
            const T* r = L + c * tw;
            T s = 0;
            for (int64_t j = 0; j < tw; ++j) s += r[j];
            gb[c] += s;
          }
          gemm<T>(true, false, Ci, tw, C, wp, Ci, L, tw, T(0), g_h.data_ptr<T>() + b * Ci * N + t0, N);
          gemm<T>(false, true, C, Ci, tw, L, tw, ht, h.stride(1), T(1), gW, Ci);
        }
        loss_part[k] = loss;
      }
    });
  });
  double loss = 0.0;
  for (double v : loss_part) loss += v;
  at::Tensor loss_t = at::scalar_tensor(loss, o);
  if (!need_grad) return {loss_t, g_h, at::empty({0}, o), at::empty({0}, o)};
  const at::Tensor tot = ch.n == 1 ? acc[0] : acc.sum(0);
  at::Tensor g_w = tot.narrow(0, 0, C * Ci).view({C, Ci}).clone();
  at::Tensor g_b = has_b ? tot.narrow(0, C * Ci, C).clone() : at::empty({0}, o);
  return {loss_t, g_h, g_w, g_b};
}

}  // namespace

// The path exp_shifted takes for float32 (its test, cpuid).
const char* cpu::linear_cross_entropy_elementwise_path() { return cpu_has_avx2() ? "avx2" : "generic"; }

TORCH_LIBRARY_IMPL(wavenet_ae, CPU, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_cpu);
}

}  // namespace wavenet_ae
