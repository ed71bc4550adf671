// Fused WaveNet residual layer, CPU kernels (forward and backward). Math and layout: csrc/residual_layer.h.
//
// The time axis of every batch item is cut into tiles of kTile columns; at::parallel_for hands each
// thread a contiguous run of (item, tile) pairs. Per tile, with X = [x(t); x(t + d); ...; lc(t)] the
// concatenated input gathered into a tile buffer (K n_res + n_lc rows):
//   forward   h = W_in X                          one GEMM (dilated conv + conditioning projection),
//                                                 written straight into `saved`
//             one pass: h += b_dil + W_gc g;  a, s = tanh, sigmoid (kept in `saved`);  z = a s
//                       (z is a tile buffer, never materialised for the whole sequence)
//             O = [W_res; W_skip] z               one GEMM into a tile buffer
//             one pass: x_out = x (current tap) + b_res + O_res;  skip = b_skip + O_skip
//   backward  G_out = [g_xout; g_skip] (read in place, no tile copy: 3-5% faster);
//             g_z = W_out^T G_out                 two GEMMs (residual rows, skip rows)
//             one pass: z = a s;  g_h = g_z (s (1 - a^2) | a s (1 - s));  row sums of g_h
//             [W_out | b_out] += G_out [z; 1]^T,  W_in += g_h X^T   3 GEMMs into per-thread
//             accumulators (reduced at the end in a fixed order: results do not depend on scheduling)
//             g_lc = W_lc^T g_h                   one GEMM into the tile's own columns
//             g_x += W_k^T g_h at tap k            K GEMMs (beta 1) into g_x: the taps of neighbouring
//             tiles overlap, so this runs when a thread owns whole batch items (B >= threads);
//             otherwise P = [W_k]^T g_h is written per tile and a second pass sums its shifted taps
//             (measured: the in-place variant is 4-9% faster where both apply).
// The backward reads the saved tanh/sigmoid values instead of recomputing them from h: no exp in the
// backward, and the same memory as saving h. Matrix products go to torch's BLAS on raw pointers
// (blas.h: single-threaded inside the parallel region); the elementwise passes are AVX2+FMA intrinsics
// for float when the CPU has them (cpuid), portable loops otherwise (and for double, used by gradcheck).
#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "residual_layer.h"

// at::parallel_for is an inline `#pragma omp parallel` under ATen's OpenMP backend: without -fopenmp
// on this translation unit every chunk runs on the calling thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#pragma message("csrc/cpu/residual_layer.cpp compiled without -fopenmp: at::parallel_for runs serially here")
#endif

#include "blas.h"
#include "chunks.h"
#include "cpu_paths.h"
#include "simd.h"

namespace wavenet_ae {
namespace {

using residual::Geom;
using cpu::Chunks;
using cpu::cpu_has_avx2;
using cpu::gemm;
using cpu::make_chunks;
#if WN_HAVE_X86
using cpu::exp8;
#endif
using Opt = std::optional<at::Tensor>;

// Columns per tile. The tile's working set (inputs, h, z, outputs: 1-3 KB per column for the tiny and
// paper presets) stays in L2; narrower tiles pay more per-GEMM overhead. 256 measured best for both
// presets on a 2-core AMD EPYC (Zen 3) VM (128 and 512 were 5-30% slower).
constexpr int64_t kTile = 256;

// ---------------------------------------------------------------------------------------------------
// elementwise passes: portable versions
// ---------------------------------------------------------------------------------------------------

// S rows [0, nd) hold h_a, rows [nd, 2nd) h_b (row stride ld): h += cb; replaced by a = tanh(h_a),
// s = sigmoid(h_b); z (nd x tw, row stride tw) = a s.
template <typename T>
void gate_fwd_generic(T* S, int64_t ld, const T* cb, int64_t nd, int64_t tw, T* z) {
  for (int64_t c = 0; c < nd; ++c) {
    T* ra = S + c * ld;
    T* rs = S + (nd + c) * ld;
    T* zr = z + c * tw;
    const T ca = cb[c], cs = cb[nd + c];
    for (int64_t t = 0; t < tw; ++t) {
      const T a = std::tanh(ra[t] + ca);
      const T s = T(1) / (T(1) + std::exp(-(rs[t] + cs)));
      ra[t] = a;
      rs[t] = s;
      zr[t] = a * s;
    }
  }
}

// From a, s (S, row stride ld) and g_z (nd x tw): z = a s (nd x tw), g_h (2nd x tw), gsum += row sums of g_h.
template <typename T>
void gate_bwd_generic(const T* S, int64_t ld, const T* gz, int64_t nd, int64_t tw, T* z, T* gh, T* gsum) {
  for (int64_t c = 0; c < nd; ++c) {
    const T* ra = S + c * ld;
    const T* rs = S + (nd + c) * ld;
    const T* gr = gz + c * tw;
    T* zr = z + c * tw;
    T* ga = gh + c * tw;
    T* gb = gh + (nd + c) * tw;
    T sa = 0, sb = 0;
    for (int64_t t = 0; t < tw; ++t) {
      const T a = ra[t], s = rs[t], g = gr[t];
      const T gs = g * s;
      zr[t] = a * s;
      const T va = gs * (T(1) - a * a);
      const T vb = gs * a * (T(1) - s);
      ga[t] = va;
      gb[t] = vb;
      sa += va;
      sb += vb;
    }
    gsum[c] += sa;
    gsum[nd + c] += sb;
  }
}

// ---------------------------------------------------------------------------------------------------
// elementwise passes: AVX2 + FMA (float)
// ---------------------------------------------------------------------------------------------------
#if WN_HAVE_X86

// tanh(a) = sign(a) (1 - 2 / (exp(2|a|) + 1)): no overflow, absolute error ~1e-7.
WN_AVX2 inline __m256 tanh8(__m256 a) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 abs = _mm256_andnot_ps(sign, a);
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(exp8(_mm256_add_ps(abs, abs)), one)));
  return _mm256_or_ps(t, _mm256_and_ps(sign, a));
}

WN_AVX2 inline __m256 sigmoid8(__m256 b) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), b))));
}

WN_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

WN_AVX2 void gate_fwd_avx2(float* S, int64_t ld, const float* cb, int64_t nd, int64_t tw, float* z) {
  for (int64_t c = 0; c < nd; ++c) {
    float* ra = S + c * ld;
    float* rs = S + (nd + c) * ld;
    float* zr = z + c * tw;
    const __m256 ca = _mm256_set1_ps(cb[c]), cs = _mm256_set1_ps(cb[nd + c]);
    int64_t t = 0;
    for (; t + 8 <= tw; t += 8) {
      const __m256 a = tanh8(_mm256_add_ps(_mm256_loadu_ps(ra + t), ca));
      const __m256 s = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(rs + t), cs));
      _mm256_storeu_ps(ra + t, a);
      _mm256_storeu_ps(rs + t, s);
      _mm256_storeu_ps(zr + t, _mm256_mul_ps(a, s));
    }
    if (t < tw) {  // tail: the same vector code on a padded copy, so every column rounds alike
      alignas(32) float ba[8] = {0}, bs[8] = {0};
      const int64_t r = tw - t;
      std::copy(ra + t, ra + tw, ba);
      std::copy(rs + t, rs + tw, bs);
      const __m256 a = tanh8(_mm256_add_ps(_mm256_load_ps(ba), ca));
      const __m256 s = sigmoid8(_mm256_add_ps(_mm256_load_ps(bs), cs));
      alignas(32) float oa[8], os[8], oz[8];
      _mm256_store_ps(oa, a);
      _mm256_store_ps(os, s);
      _mm256_store_ps(oz, _mm256_mul_ps(a, s));
      std::copy(oa, oa + r, ra + t);
      std::copy(os, os + r, rs + t);
      std::copy(oz, oz + r, zr + t);
    }
  }
}

WN_AVX2 void gate_bwd_avx2(const float* S, int64_t ld, const float* gz, int64_t nd, int64_t tw, float* z,
                            float* gh, float* gsum) {
  const __m256 one = _mm256_set1_ps(1.f);
  for (int64_t c = 0; c < nd; ++c) {
    const float* ra = S + c * ld;
    const float* rs = S + (nd + c) * ld;
    const float* gr = gz + c * tw;
    float* zr = z + c * tw;
    float* ga = gh + c * tw;
    float* gb = gh + (nd + c) * tw;
    __m256 sa = _mm256_setzero_ps(), sb = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= tw; t += 8) {
      const __m256 a = _mm256_loadu_ps(ra + t), s = _mm256_loadu_ps(rs + t), g = _mm256_loadu_ps(gr + t);
      const __m256 gs = _mm256_mul_ps(g, s);
      _mm256_storeu_ps(zr + t, _mm256_mul_ps(a, s));
      const __m256 va = _mm256_mul_ps(gs, _mm256_sub_ps(one, _mm256_mul_ps(a, a)));
      const __m256 vb = _mm256_mul_ps(_mm256_mul_ps(gs, a), _mm256_sub_ps(one, s));
      _mm256_storeu_ps(ga + t, va);
      _mm256_storeu_ps(gb + t, vb);
      sa = _mm256_add_ps(sa, va);
      sb = _mm256_add_ps(sb, vb);
    }
    float ta = hsum8(sa), tb = hsum8(sb);
    for (; t < tw; ++t) {
      const float a = ra[t], s = rs[t], g = gr[t];
      const float gs = g * s;
      zr[t] = a * s;
      const float va = gs * (1.f - a * a);
      const float vb = gs * a * (1.f - s);
      ga[t] = va;
      gb[t] = vb;
      ta += va;
      tb += vb;
    }
    gsum[c] += ta;
    gsum[nd + c] += tb;
  }
}

#endif  // WN_HAVE_X86

template <typename T>
void gate_fwd(T* S, int64_t ld, const T* cb, int64_t nd, int64_t tw, T* z) {
#if WN_HAVE_X86
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) return gate_fwd_avx2(S, ld, cb, nd, tw, z);
  }
#endif
  gate_fwd_generic(S, ld, cb, nd, tw, z);
}

template <typename T>
void gate_bwd(const T* S, int64_t ld, const T* gz, int64_t nd, int64_t tw, T* z, T* gh, T* gsum) {
#if WN_HAVE_X86
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) return gate_bwd_avx2(S, ld, gz, nd, tw, z, gh, gsum);
  }
#endif
  gate_bwd_generic(S, ld, gz, nd, tw, z, gh, gsum);
}

// ---------------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------------

void check_cpu(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors, got x on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32 and float64, got ", x.scalar_type());
}

using residual::input_matrix;
using residual::output_matrix;

// b_dil + W_gc g: (B, 2nd).
at::Tensor gate_bias(const at::Tensor& g, const at::Tensor& w_gc, const Opt& b_dil) {
  return residual::present(b_dil) ? at::addmm(*b_dil, g, w_gc.t()) : at::mm(g, w_gc.t());
}

// Tile of the concatenated input [x(t + 0 d); ...; x(t + (K-1) d); lc(t)] for computed columns
// [t0, t0 + tw) of item b, into X (Kc rows, row stride tw).
template <typename T>
void gather_input(const Geom& G, const at::Tensor& x, const at::Tensor& lc, int64_t b, int64_t t0, int64_t tw, T* X) {
  const T* xp = x.const_data_ptr<T>() + b * x.stride(0);
  for (int64_t k = 0; k < G.K; ++k) {
    const T* src = xp + k * G.d + G.c0 + t0;
    for (int64_t r = 0; r < G.nr; ++r) std::copy(src + r * x.stride(1), src + r * x.stride(1) + tw, X + (k * G.nr + r) * tw);
  }
  const T* lp = lc.const_data_ptr<T>() + b * lc.stride(0) + G.lc_off + t0;
  T* dst = X + G.K * G.nr * tw;
  for (int64_t r = 0; r < G.nlc; ++r) std::copy(lp + r * lc.stride(1), lp + r * lc.stride(1) + tw, dst + r * tw);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_layer_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& lc_, const at::Tensor& g_, const at::Tensor& w_dil, const Opt& b_dil,
    const at::Tensor& w_lc, const at::Tensor& w_gc, const Opt& w_res, const Opt& b_res, const at::Tensor& w_skip,
    const Opt& b_skip, int64_t dilation, int64_t n_out) {
  constexpr const char* op = residual::kFwdOp;
  check_cpu(x_, op);
  const Geom G = residual::check_args(op, x_, lc_, g_, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip,
                                      dilation, n_out);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = residual::rows_contiguous(x_);
  const at::Tensor lc = residual::rows_contiguous(lc_);
  const at::Tensor Win = input_matrix(w_dil, w_lc);          // (2nd, Kc)
  const at::Tensor Wout = output_matrix(G, w_res, w_skip);   // (n_o, nd), n_o = [nr +] ns
  const at::Tensor cb = gate_bias(g_, w_gc, b_dil).contiguous();  // (B, 2nd)
  const at::TensorOptions o = x.options();
  const int64_t nd2 = 2 * G.nd, Kc = G.kc(), n_res_rows = G.has_res ? G.nr : 0, n_o = n_res_rows + G.ns;
  at::Tensor S = at::empty({G.B, nd2, G.nc}, o);
  at::Tensor x_out = G.has_res ? at::empty({G.B, G.nr, G.n}, o) : at::empty({0}, o);
  at::Tensor skip = at::empty({G.B, G.ns, G.n_out}, o);

  const int64_t tiles_per_item = (G.nc + kTile - 1) / kTile;
  const Chunks ch = make_chunks(G.B * tiles_per_item);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_layer_fwd_cpu", [&] {
    using T = scalar_t;
    const T* br = residual::present(b_res) ? b_res->const_data_ptr<T>() : nullptr;
    const T* bs = residual::present(b_skip) ? b_skip->const_data_ptr<T>() : nullptr;
    at::parallel_for(0, ch.n, 1, [&](int64_t c_begin, int64_t c_end) {
      at::AutoDispatchBelowADInplaceOrView below;  // worker threads: no autograd bookkeeping
      at::Tensor xbuf = at::empty({Kc * kTile}, o), zbuf = at::empty({G.nd * kTile}, o),
                 obuf = at::empty({n_o * kTile}, o);
      T* X = xbuf.data_ptr<T>();
      T* z = zbuf.data_ptr<T>();
      T* op_ = obuf.data_ptr<T>();
      const T* win = Win.const_data_ptr<T>();
      const T* wout = Wout.const_data_ptr<T>();
      for (int64_t c = c_begin; c < c_end; ++c) {
        for (int64_t i = ch.begin(c); i < ch.begin(c + 1); ++i) {
          const int64_t b = i / tiles_per_item, t0 = (i % tiles_per_item) * kTile;
          const int64_t tw = std::min(kTile, G.nc - t0);
          const int64_t lo = std::max(t0, G.cs);  // first column of the tile that feeds the skip output
          // h = W_in [x taps; lc]  (one GEMM), into `saved`
          gather_input<T>(G, x, lc, b, t0, tw, X);
          T* h = S.data_ptr<T>() + b * S.stride(0) + t0;
          gemm<T>(false, false, nd2, tw, Kc, win, Kc, X, tw, T(0), h, G.nc);
          // h += b_dil + W_gc g;  a, s = tanh, sigmoid (kept);  z = a s
          gate_fwd<T>(h, G.nc, cb.const_data_ptr<T>() + b * nd2, G.nd, tw, z);
          // [res; skip] = W_out z  (one GEMM; the residual rows only when no column feeds the skip)
          const int64_t rows = lo < t0 + tw ? n_o : n_res_rows;
          if (rows == 0) continue;
          gemm<T>(false, false, rows, tw, G.nd, wout, G.nd, z, tw, T(0), op_, tw);
          if (G.has_res) {  // x_out = x (current tap) + b_res + W_res z
            T* xo = x_out.data_ptr<T>() + b * x_out.stride(0) + t0;
            const T* xi = x.const_data_ptr<T>() + b * x.stride(0) + (G.K - 1) * G.d + t0;
            for (int64_t r = 0; r < G.nr; ++r) {
              T* dst = xo + r * G.n;
              const T* src = xi + r * x.stride(1);
              const T* ov = op_ + r * tw;
              const T bias = br ? br[r] : T(0);
              for (int64_t t = 0; t < tw; ++t) dst[t] = src[t] + bias + ov[t];
            }
          }
          if (rows > n_res_rows) {  // skip = b_skip + W_skip z
            T* sp = skip.data_ptr<T>() + b * skip.stride(0) + (lo - G.cs);
            const int64_t w = t0 + tw - lo;
            for (int64_t r = 0; r < G.ns; ++r) {
              T* dst = sp + r * G.n_out;
              const T* ov = op_ + (n_res_rows + r) * tw + (lo - t0);
              const T bias = bs ? bs[r] : T(0);
              for (int64_t t = 0; t < w; ++t) dst[t] = ov[t] + bias;
            }
          }
        }
      }
    });
  });
  return {x_out, skip, S};
}

std::vector<at::Tensor> residual_layer_bwd_cpu(
    const Opt& grad_x_out, const at::Tensor& grad_skip, const at::Tensor& x_, const at::Tensor& lc_,
    const at::Tensor& g, const at::Tensor& saved, const at::Tensor& w_dil, const Opt& b_dil, const at::Tensor& w_lc,
    const at::Tensor& w_gc, const Opt& w_res, const Opt& b_res, const at::Tensor& w_skip, const Opt& b_skip,
    int64_t dilation, int64_t n_out, bool need_x, bool need_lc, bool need_g) {
  constexpr const char* op = residual::kBwdOp;
  check_cpu(x_, op);
  const Geom G = residual::check_args(op, x_, lc_, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip,
                                      dilation, n_out);
  const bool have_gxo = residual::check_grads(op, G, saved, grad_x_out, grad_skip, x_);
  TORCH_CHECK(saved.is_contiguous(), op, ": saved must be contiguous");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x = residual::rows_contiguous(x_);
  const at::Tensor lc = residual::rows_contiguous(lc_);
  const at::Tensor gs = residual::rows_contiguous(grad_skip);
  const at::Tensor gxo = have_gxo ? residual::rows_contiguous(*grad_x_out) : at::Tensor();
  const at::Tensor Win = input_matrix(w_dil, w_lc);          // (2nd, Kc)
  const at::Tensor Wout = output_matrix(G, w_res, w_skip);   // (n_o, nd)
  const at::TensorOptions o = x.options();
  const int64_t nd2 = 2 * G.nd, Kc = G.kc(), Knr = G.K * G.nr, n_res_rows = G.has_res ? G.nr : 0,
                n_o = n_res_rows + G.ns;

  // Per-chunk accumulators, one row each: [gW_in (2nd, Kc) | [gW_out gb_out] (n_o, nd + 1) | ghsum (B, 2nd)]
  const int64_t nd1 = G.nd + 1, o_wi = 0, o_wo = o_wi + nd2 * Kc, o_hs = o_wo + n_o * nd1, acc_len = o_hs + G.B * nd2;
  const int64_t tiles_per_item = (G.nc + kTile - 1) / kTile;
  // Input gradients: the taps of different tiles overlap in g_x. With at least one batch item per
  // thread, a thread owns whole items and accumulates W_k^T g_h into g_x directly (GEMMs with beta 1);
  // otherwise (few items) tiles are spread over threads, P = W_in^T g_h is written per tile and a second
  // pass sums its shifted taps.
  const bool by_item = need_x && G.B >= at::get_num_threads();
  const Chunks ch = make_chunks(by_item ? G.B : G.B * tiles_per_item);
  const int64_t tiles_per_unit = by_item ? tiles_per_item : 1;
  at::Tensor acc = at::zeros({ch.n, acc_len}, o);
  at::Tensor g_x = need_x ? at::empty({G.B, G.nr, G.L}, o) : at::empty({0}, o);
  at::Tensor g_lc = need_lc ? at::empty({G.B, G.nlc, G.Llc}, o) : at::empty({0}, o);
  at::Tensor P = (need_x && !by_item) ? at::empty({G.B, Knr, G.nc}, o) : at::Tensor();
  if (need_lc && G.lc_off > 0) g_lc.narrow(2, 0, G.lc_off).zero_();  // columns no output depends on

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_layer_bwd_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, ch.n, 1, [&](int64_t c_begin, int64_t c_end) {
      at::AutoDispatchBelowADInplaceOrView below;
      at::Tensor gzbuf = at::empty({G.nd * kTile}, o), zbuf = at::empty({nd1 * kTile}, o),
                 ghbuf = at::empty({nd2 * kTile}, o), xbuf = at::empty({Kc * kTile}, o);
      T* gz = gzbuf.data_ptr<T>();
      T* z1 = zbuf.data_ptr<T>();  // z with a row of ones below it
      T* gh = ghbuf.data_ptr<T>();
      T* X = xbuf.data_ptr<T>();
      const T* win = Win.const_data_ptr<T>();
      const T* wout = Wout.const_data_ptr<T>();
      for (int64_t c = c_begin; c < c_end; ++c) {
        T* a = acc.data_ptr<T>() + c * acc_len;
        T* gWin = a + o_wi;   // (2nd, Kc)
        T* gWout = a + o_wo;  // (n_o, nd + 1): bias gradient in the last column
        T* ghs = a + o_hs;
        for (int64_t i = ch.begin(c) * tiles_per_unit; i < ch.begin(c + 1) * tiles_per_unit; ++i) {
          const int64_t b = i / tiles_per_item, t0 = (i % tiles_per_item) * kTile;
          const int64_t tw = std::min(kTile, G.nc - t0);
          const int64_t lo = std::max(t0, G.cs);  // first column of the tile that feeds the skip output
          if (by_item && t0 == 0) {  // this thread's item: g_x = the residual pass-through
            {
              for (int64_t r = 0; r < G.nr; ++r) {
                T* dst = g_x.data_ptr<T>() + (b * G.nr + r) * G.L;
                const int64_t sh = (G.K - 1) * G.d;
                if (have_gxo) {
                  const T* src = gxo.const_data_ptr<T>() + b * gxo.stride(0) + r * gxo.stride(1);
                  std::fill(dst, dst + sh, T(0));
                  std::copy(src, src + G.n, dst + sh);
                } else {
                  std::fill(dst, dst + G.L, T(0));
                }
              }
            }
          }
          // The output gradients are read where they lie (row strides of g_xout and g_skip), not
          // stacked into a tile: G_out = [g_xout; g_skip], with g_skip only from column lo on.
          const T* gxt = have_gxo ? gxo.const_data_ptr<T>() + b * gxo.stride(0) + t0 : nullptr;
          const int64_t ws = t0 + tw - lo;  // columns of the tile that feed the skip output
          const T* gst = ws > 0 ? gs.const_data_ptr<T>() + b * gs.stride(0) + (lo - G.cs) : nullptr;
          const T* wskip = wout + n_res_rows * G.nd;
          // g_z = W_res^T g_xout + W_skip^T g_skip
          if (gxt) gemm<T>(true, false, G.nd, tw, G.nr, wout, G.nd, gxt, gxo.stride(1), T(0), gz, tw);
          else std::fill(gz, gz + G.nd * tw, T(0));
          if (gst) gemm<T>(true, false, G.nd, ws, G.ns, wskip, G.nd, gst, gs.stride(1), T(1), gz + (lo - t0), tw);
          // z gets a row of ones below it: G_out [z; 1]^T gives the output weights' and biases' gradients
          std::fill(z1 + G.nd * tw, z1 + nd1 * tw, T(1));
          // z = a s;  g_h;  row sums of g_h (bias and global-conditioning gradients)
          gate_bwd<T>(saved.const_data_ptr<T>() + b * saved.stride(0) + t0, G.nc, gz, G.nd, tw, z1, gh,
                      ghs + b * nd2);
          // weight gradients: [W_res b_res] += g_xout [z; 1]^T,  [W_skip b_skip] += g_skip [z; 1]^T,
          // W_in += g_h X^T
          if (gxt) gemm<T>(false, true, G.nr, nd1, tw, gxt, gxo.stride(1), z1, tw, T(1), gWout, nd1);
          if (gst) gemm<T>(false, true, G.ns, nd1, ws, gst, gs.stride(1), z1 + (lo - t0), tw, T(1),
                           gWout + n_res_rows * nd1, nd1);
          gather_input<T>(G, x, lc, b, t0, tw, X);
          gemm<T>(false, true, nd2, Kc, tw, gh, tw, X, tw, T(1), gWin, Kc);
          // input gradients: g_lc = W_lc^T g_h (its own columns);  g_x += W_k^T g_h at each tap (in
          // place, this thread owns the item) or P = [W_k]^T g_h for the second pass
          if (need_lc) {
            T* lt = g_lc.data_ptr<T>() + b * G.nlc * G.Llc + G.lc_off + t0;
            gemm<T>(true, false, G.nlc, tw, nd2, win + Knr, Kc, gh, tw, T(0), lt, G.Llc);
          }
          if (by_item) {
            for (int64_t k = 0; k < G.K; ++k) {
              T* xt = g_x.data_ptr<T>() + b * G.nr * G.L + k * G.d + G.c0 + t0;
              gemm<T>(true, false, G.nr, tw, nd2, win + k * G.nr, Kc, gh, tw, T(1), xt, G.L);
            }
          } else if (need_x) {
            T* pt = P.data_ptr<T>() + b * Knr * G.nc + t0;
            gemm<T>(true, false, Knr, tw, nd2, win, Kc, gh, tw, T(0), pt, G.nc);
          }
        }
      }
    });
  });

  const at::Tensor tot = ch.n == 1 ? acc[0] : acc.sum(0);
  const at::Tensor ghsum = tot.narrow(0, o_hs, G.B * nd2).view({G.B, nd2});
  const at::Tensor gWin = tot.narrow(0, o_wi, nd2 * Kc).view({nd2, Kc});
  const at::Tensor gWout = tot.narrow(0, o_wo, n_o * nd1).view({n_o, nd1});
  at::Tensor g_w_dil = gWin.narrow(1, 0, Knr).reshape({nd2, G.K, G.nr}).permute({0, 2, 1}).contiguous();
  at::Tensor g_w_lc = gWin.narrow(1, Knr, G.nlc).contiguous().view({nd2, G.nlc, 1});
  at::Tensor g_w_gc = at::mm(ghsum.t(), g);
  at::Tensor g_b_dil = residual::present(b_dil) ? ghsum.sum(0) : at::empty({0}, o);
  at::Tensor g_g = need_g ? at::mm(ghsum, w_gc) : at::empty({0}, o);
  const at::Tensor gWo = gWout.narrow(1, 0, G.nd), gbo = gWout.select(1, G.nd);
  at::Tensor g_w_res = G.has_res ? gWo.narrow(0, 0, G.nr).contiguous().view({G.nr, G.nd, 1}) : at::empty({0}, o);
  at::Tensor g_b_res = residual::present(b_res) ? gbo.narrow(0, 0, G.nr).contiguous() : at::empty({0}, o);
  at::Tensor g_w_skip = gWo.narrow(0, n_res_rows, G.ns).contiguous().view({G.ns, G.nd, 1});
  at::Tensor g_b_skip = residual::present(b_skip) ? gbo.narrow(0, n_res_rows, G.ns).contiguous() : at::empty({0}, o);

  // second pass of the tile-parallel path: g_x[:, u] = g_xout[:, u - (K-1) d] + sum_k P_k[:, u - k d - c0]
  // (terms outside their range are 0)
  if (P.defined()) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_layer_bwd_cpu_gx", [&] {
      using T = scalar_t;
      const T* pp = P.const_data_ptr<T>();
      at::parallel_for(0, G.B * G.nr, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t b = row / G.nr, r = row % G.nr;
          T* dst = g_x.data_ptr<T>() + row * G.L;
          std::fill(dst, dst + G.L, T(0));
          if (have_gxo) {
            const T* src = gxo.const_data_ptr<T>() + b * gxo.stride(0) + r * gxo.stride(1);
            T* d2 = dst + (G.K - 1) * G.d;
            for (int64_t t = 0; t < G.n; ++t) d2[t] += src[t];
          }
          for (int64_t k = 0; k < G.K; ++k) {
            const T* src = pp + (b * Knr + k * G.nr + r) * G.nc;
            T* d2 = dst + k * G.d + G.c0;
            for (int64_t t = 0; t < G.nc; ++t) d2[t] += src[t];
          }
        }
      });
    });
  }
  return {g_x, g_lc, g_g, g_w_dil, g_b_dil, g_w_lc, g_w_gc, g_w_res, g_b_res, g_w_skip, g_b_skip};
}

// How the CPU kernel runs here: elementwise path and threading.
std::string residual_layer_cpu_info(const at::Tensor& /*like*/) {
  std::string s = std::string("elementwise=") + cpu::residual_layer_elementwise_path();
  s += std::string(" gemm=") + cpu::gemm_path();
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
  s += " threads=1 (built without -fopenmp: at::parallel_for is serial in this kernel)";
#else
  s += " threads=" + std::to_string(at::get_num_threads());
#endif
  return s;
}

}  // namespace

// The path gate_fwd / gate_bwd take for float32 (their test, cpuid).
const char* cpu::residual_layer_elementwise_path() { return cpu_has_avx2() ? "avx2" : "generic"; }

TORCH_LIBRARY_IMPL(wavenet_ae, CPU, m) {
  m.impl("residual_layer_cpu_info", &residual_layer_cpu_info);
  m.impl("residual_layer_fwd", &residual_layer_fwd_cpu);
  m.impl("residual_layer_bwd", &residual_layer_bwd_cpu);
}

}  // namespace wavenet_ae
