// Fused WaveNet residual layer, CPU kernels (forward and backward). Math and layout: csrc/residual.h.
//
// The time axis of every batch item is cut into tiles of kTile columns; at::parallel_for hands each
// thread a contiguous run of (item, tile) pairs. Per tile everything stays in cache:
//   forward   h = sum_k W_k x_k + W_lc lc       (K + 1 accumulating GEMMs, written into `saved`)
//             one pass: h += b_dil + W_gc g;  a = tanh, s = sigmoid (kept in `saved` for backward);
//                       z = a s (a tile-local buffer: never materialised for the whole sequence)
//             x_out = x + b_res + W_res z;  skip = b_skip + W_skip z      (GEMMs from the buffer)
//   backward  g_z = W_res^T g_xout + W_skip^T g_skip                       (GEMMs, tile buffer)
//             one pass: z = a s;  g_h = g_z (s (1 - a^2) | a s (1 - s)); row sums of g_h
//             weight gradients accumulate per thread (GEMMs over the tile; reduced at the end in a
//             fixed order, so results do not depend on scheduling); P = [W_k]^T g_h (all taps in
//             one GEMM) and g_lc = W_lc^T g_h are written per tile; a second pass sums the shifted
//             taps of P and the residual pass-through into g_x (taps overlap across tiles).
// Matrix products are ATen GEMMs (at::mm_out / addmm_, single-threaded inside the parallel region);
// the elementwise passes are AVX2+FMA intrinsics for float when the CPU has them (cpuid), portable
// loops otherwise (and for double, which the gradcheck tests use).
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

#include "residual.h"

// at::parallel_for is an inline `#pragma omp parallel` under ATen's OpenMP backend: without -fopenmp
// on this translation unit every chunk runs on the calling thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#pragma message("csrc/cpu/residual.cpp compiled without -fopenmp: at::parallel_for runs serially here")
#endif

#if defined(__x86_64__) || defined(__i386__)
#define RES_HAVE_X86 1
#include <immintrin.h>
#define RES_AVX2 __attribute__((target("avx2,fma")))
#else
#define RES_HAVE_X86 0
#endif

namespace wavenet_ae {
namespace {

using residual::Geom;
using Opt = std::optional<at::Tensor>;

// Columns per tile. The tile's working set (inputs, h, z, outputs: 1-3 KB per column for the tiny and
// paper presets) stays in L2; narrower tiles pay more per-GEMM overhead. 256 measured best for both
// presets on a 2-core AMD EPYC (Zen 3) VM (128 and 512 were 5-30% slower).
constexpr int64_t kTile = 256;

// (rows, cols) view of batch item b of a (B, C, T) tensor: channels [r0, r0 + rows), steps [t0, t0 + cols).
at::Tensor tile(const at::Tensor& t, int64_t b, int64_t r0, int64_t rows, int64_t t0, int64_t cols) {
  return t.as_strided({rows, cols}, {t.stride(1), t.stride(2)},
                      t.storage_offset() + b * t.stride(0) + r0 * t.stride(1) + t0 * t.stride(2));
}

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
#if RES_HAVE_X86

// exp with the Cephes polynomial (as in avx_mathfun): relative error ~1e-7 on [-88, 88].
RES_AVX2 inline __m256 exp8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, one));
  __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  e = _mm256_slli_epi32(e, 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// tanh(a) = sign(a) (1 - 2 / (exp(2|a|) + 1)): no overflow, absolute error ~1e-7.
RES_AVX2 inline __m256 tanh8(__m256 a) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 abs = _mm256_andnot_ps(sign, a);
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(exp8(_mm256_add_ps(abs, abs)), one)));
  return _mm256_or_ps(t, _mm256_and_ps(sign, a));
}

RES_AVX2 inline __m256 sigmoid8(__m256 b) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), b))));
}

RES_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

RES_AVX2 void gate_fwd_avx2(float* S, int64_t ld, const float* cb, int64_t nd, int64_t tw, float* z) {
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

RES_AVX2 void gate_bwd_avx2(const float* S, int64_t ld, const float* gz, int64_t nd, int64_t tw, float* z,
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

bool cpu_has_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}
#else
bool cpu_has_avx2() { return false; }
#endif  // RES_HAVE_X86

template <typename T>
void gate_fwd(T* S, int64_t ld, const T* cb, int64_t nd, int64_t tw, T* z) {
#if RES_HAVE_X86
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) return gate_fwd_avx2(S, ld, cb, nd, tw, z);
  }
#endif
  gate_fwd_generic(S, ld, cb, nd, tw, z);
}

template <typename T>
void gate_bwd(const T* S, int64_t ld, const T* gz, int64_t nd, int64_t tw, T* z, T* gh, T* gsum) {
#if RES_HAVE_X86
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

// Contiguous chunks of work items, one per thread: results do not depend on thread scheduling.
struct Chunks {
  int64_t items, n;
  int64_t begin(int64_t c) const { return c * items / n; }
};

Chunks make_chunks(int64_t items) {
  return {items, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items))};
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

// A (rows, cols) contiguous view of the front of a flat buffer.
at::Tensor front(const at::Tensor& buf, int64_t rows, int64_t cols) { return buf.narrow(0, 0, rows * cols).view({rows, cols}); }

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
      for (int64_t c = c_begin; c < c_end; ++c) {
        for (int64_t i = ch.begin(c); i < ch.begin(c + 1); ++i) {
          const int64_t b = i / tiles_per_item, t0 = (i % tiles_per_item) * kTile;
          const int64_t tw = std::min(kTile, G.nc - t0);
          const int64_t lo = std::max(t0, G.cs);  // first column of the tile that feeds the skip output
          // h = W_in [x taps; lc]  (one GEMM), into `saved`
          const at::Tensor X = front(xbuf, Kc, tw);
          gather_input<T>(G, x, lc, b, t0, tw, X.data_ptr<T>());
          at::Tensor h = tile(S, b, 0, nd2, t0, tw);
          at::mm_out(h, Win, X);
          // h += b_dil + W_gc g;  a, s = tanh, sigmoid (kept);  z = a s
          const at::Tensor z = front(zbuf, G.nd, tw);
          gate_fwd<T>(S.data_ptr<T>() + b * S.stride(0) + t0, G.nc, cb.const_data_ptr<T>() + b * nd2, G.nd, tw,
                      z.data_ptr<T>());
          // [res; skip] = W_out z  (one GEMM; the residual rows only when no column feeds the skip)
          const int64_t rows = lo < t0 + tw ? n_o : n_res_rows;
          if (rows == 0) continue;
          at::Tensor O = front(obuf, rows, tw);
          at::mm_out(O, Wout.narrow(0, 0, rows), z);
          const T* op_ = O.const_data_ptr<T>();
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
  // input-gradient rows of P = W_in^T g_h that are needed: [x taps] [lc]
  const int64_t p_lo = need_x ? 0 : Knr, p_hi = need_lc ? Kc : Knr, p_rows = std::max<int64_t>(0, p_hi - p_lo);

  // Per-chunk accumulators, one row each: [gW_in (2nd, Kc) | [gW_out gb_out] (n_o, nd + 1) | ghsum (B, 2nd)]
  const int64_t nd1 = G.nd + 1, o_wi = 0, o_wo = o_wi + nd2 * Kc, o_hs = o_wo + n_o * nd1, acc_len = o_hs + G.B * nd2;
  const int64_t tiles_per_item = (G.nc + kTile - 1) / kTile;
  const Chunks ch = make_chunks(G.B * tiles_per_item);
  at::Tensor acc = at::zeros({ch.n, acc_len}, o);
  at::Tensor P = p_rows > 0 ? at::empty({G.B, p_rows, G.nc}, o) : at::Tensor();
  const at::Tensor WinT_p = p_rows > 0 ? Win.narrow(1, p_lo, p_rows).t() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_layer_bwd_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, ch.n, 1, [&](int64_t c_begin, int64_t c_end) {
      at::AutoDispatchBelowADInplaceOrView below;
      at::Tensor gobuf = at::empty({n_o * kTile}, o), gzbuf = at::empty({G.nd * kTile}, o),
                 zbuf = at::empty({nd1 * kTile}, o), ghbuf = at::empty({nd2 * kTile}, o),
                 xbuf = at::empty({Kc * kTile}, o);
      for (int64_t c = c_begin; c < c_end; ++c) {
        at::Tensor a = acc[c];
        at::Tensor gWin = a.narrow(0, o_wi, nd2 * Kc).view({nd2, Kc});
        at::Tensor gWout = a.narrow(0, o_wo, n_o * nd1).view({n_o, nd1});  // bias gradient in the last column
        T* ghs = a.data_ptr<T>() + o_hs;
        for (int64_t i = ch.begin(c); i < ch.begin(c + 1); ++i) {
          const int64_t b = i / tiles_per_item, t0 = (i % tiles_per_item) * kTile;
          const int64_t tw = std::min(kTile, G.nc - t0);
          const int64_t lo = std::max(t0, G.cs);  // first column of the tile that feeds the skip output
          // G_out = [g_xout; g_skip] for the tile (zeros where a column feeds no output)
          const int64_t rows = lo < t0 + tw ? n_o : n_res_rows;
          at::Tensor Go = front(gobuf, rows, tw);
          T* gop = Go.data_ptr<T>();
          for (int64_t r = 0; r < n_res_rows; ++r) {
            T* dst = gop + r * tw;
            if (have_gxo) {
              const T* src = gxo.const_data_ptr<T>() + b * gxo.stride(0) + r * gxo.stride(1) + t0;
              std::copy(src, src + tw, dst);
            } else {
              std::fill(dst, dst + tw, T(0));
            }
          }
          if (rows > n_res_rows) {
            for (int64_t r = 0; r < G.ns; ++r) {
              T* dst = gop + (n_res_rows + r) * tw;
              const T* src = gs.const_data_ptr<T>() + b * gs.stride(0) + r * gs.stride(1) + (lo - G.cs);
              std::fill(dst, dst + (lo - t0), T(0));
              std::copy(src, src + (t0 + tw - lo), dst + (lo - t0));
            }
          }
          // g_z = W_out^T G_out  (one GEMM)
          // z gets a row of ones below it: G_out [z; 1]^T gives the output weights' and biases' gradients
          at::Tensor gz = front(gzbuf, G.nd, tw), z1 = front(zbuf, nd1, tw), gh = front(ghbuf, nd2, tw);
          at::Tensor z = z1.narrow(0, 0, G.nd);
          std::fill(z1.data_ptr<T>() + G.nd * tw, z1.data_ptr<T>() + nd1 * tw, T(1));
          if (rows > 0) at::mm_out(gz, Wout.narrow(0, 0, rows).t(), Go);
          else gz.zero_();
          // z = a s;  g_h;  row sums of g_h (bias and global-conditioning gradients)
          gate_bwd<T>(saved.const_data_ptr<T>() + b * saved.stride(0) + t0, G.nc, gz.const_data_ptr<T>(), G.nd, tw,
                      z.data_ptr<T>(), gh.data_ptr<T>(), ghs + b * nd2);
          // weight gradients: [W_out b_out] += G_out [z; 1]^T,  W_in += g_h X^T
          if (rows > 0) gWout.narrow(0, 0, rows).addmm_(Go, z1.t());
          const at::Tensor X = front(xbuf, Kc, tw);
          gather_input<T>(G, x, lc, b, t0, tw, X.data_ptr<T>());
          gWin.addmm_(gh, X.t());
          // input gradients before the shifts: P = W_in^T g_h  (one GEMM)
          if (p_rows > 0) {
            at::Tensor pt = tile(P, b, 0, p_rows, t0, tw);
            at::mm_out(pt, WinT_p, gh);
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

  // g_x[:, u] = g_xout[:, u - (K-1) d] + sum_k P_k[:, u - k d - c0];  g_lc[:, u] = P_lc[:, u - lc_off]
  // (terms outside their range are 0). The taps overlap across tiles, hence this second pass.
  at::Tensor g_x = need_x ? at::empty({G.B, G.nr, G.L}, o) : at::empty({0}, o);
  at::Tensor g_lc = need_lc ? at::empty({G.B, G.nlc, G.Llc}, o) : at::empty({0}, o);
  if (p_rows > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_layer_bwd_cpu_inputs", [&] {
      using T = scalar_t;
      const T* pp = P.const_data_ptr<T>();
      const int64_t rx = need_x ? G.nr : 0, rl = need_lc ? G.nlc : 0;
      at::parallel_for(0, G.B * (rx + rl), 16, [&](int64_t r0, int64_t r1) {
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t b = row / (rx + rl), r = row % (rx + rl);
          if (r < rx) {
            T* dst = g_x.data_ptr<T>() + (b * G.nr + r) * G.L;
            std::fill(dst, dst + G.L, T(0));
            if (have_gxo) {
              const T* src = gxo.const_data_ptr<T>() + b * gxo.stride(0) + r * gxo.stride(1);
              T* d2 = dst + (G.K - 1) * G.d;
              for (int64_t t = 0; t < G.n; ++t) d2[t] += src[t];
            }
            for (int64_t k = 0; k < G.K; ++k) {
              const T* src = pp + (b * p_rows + k * G.nr + r) * G.nc;
              T* d2 = dst + k * G.d + G.c0;
              for (int64_t t = 0; t < G.nc; ++t) d2[t] += src[t];
            }
          } else {
            const int64_t rr = r - rx;
            T* dst = g_lc.data_ptr<T>() + (b * G.nlc + rr) * G.Llc;
            const T* src = pp + (b * p_rows + (Knr - p_lo) + rr) * G.nc;
            std::fill(dst, dst + G.lc_off, T(0));
            std::copy(src, src + G.nc, dst + G.lc_off);
          }
        }
      });
    });
  }
  return {g_x, g_lc, g_g, g_w_dil, g_b_dil, g_w_lc, g_w_gc, g_w_res, g_b_res, g_w_skip, g_b_skip};
}

// How the CPU kernel runs here: elementwise path and threading.
std::string residual_layer_cpu_info(const at::Tensor& /*like*/) {
  std::string s = cpu_has_avx2() ? "elementwise=avx2" : "elementwise=generic";
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
  s += " threads=1 (built without -fopenmp: at::parallel_for is serial in this kernel)";
#else
  s += " threads=" + std::to_string(at::get_num_threads());
#endif
  return s;
}

}  // namespace

TORCH_LIBRARY_IMPL(wavenet_ae, CPU, m) {
  m.impl("residual_layer_cpu_info", &residual_layer_cpu_info);
  m.impl("residual_layer_fwd", &residual_layer_fwd_cpu);
  m.impl("residual_layer_bwd", &residual_layer_bwd_cpu);
}

}  // namespace wavenet_ae
