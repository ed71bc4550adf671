// Incremental WaveNet generation, CPU engine: the whole autoregressive loop over a chunk of steps in
// one op call, batch items split across threads (at::get_num_threads() std::threads, one contiguous
// block of items each; no synchronisation inside), or, for one item, its products split (see below).
//
// Two paths, chosen at run time (never by -march):
//   generic  one item at a time through gen::step (csrc/wavenet_step.h) with a team of one thread:
//            the same orchestration the CUDA kernel runs; plain loops the compiler vectorises.
//   avx2     all items of a thread together, layer by layer: register-tiled mat-mat products
//            (up to 4 items x 64 outputs per tile, AVX2 + FMA intrinsics, weights repacked into
//            16-column panels once per call and read once per tile for all its items), vectorised
//            gate and sampler exponentials (same summation order as
//            the generic sampler). Needs avx2+fma+f16c (checked with cpuid).
// `path="auto"` takes avx2 when the CPU has it; wavenet_generate_cpu_path says which one runs.
// Batch 1 on >= 2 threads (avx2 path) runs as a team instead: every layer's products split across the
// threads, one spin barrier per layer (run_team below). It needs free cores: on an oversubscribed
// machine its barriers wait for descheduled threads.
//
// Weight matrices (w_dil, w_out, w_post1, w_post2) may be float32, float16 or bfloat16 on both paths:
// reduced precision halves the bytes streamed per step, which bounds batch-1 speed (the paper decoder's
// 3.5 MB of float32 matrices do not fit a core's L2). They are widened to float32 as they are loaded
// (avx2: F16C for fp16, a 16-bit shift for bf16; generic: c10::Half / c10::BFloat16 conversions, the
// portable reference of the same arithmetic); products, sums, activations and queues stay float32.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "wavenet_generate_host.h"
#include "wavenet_step.h"

#include "cpu_paths.h"
#include "simd.h"

namespace wavenet_ae {
namespace {

using cpu::cpu_has_avx2;
#if WN_HAVE_X86
using cpu::exp8;

// The avx2 path's functions: AVX2 + FMA, and F16C for the fp16 weights' vcvtph2ps (every AVX2 CPU
// has it, but it is a separate cpuid bit: checked with the others).
#define WN_GEN __attribute__((target("avx2,fma,f16c")))

bool cpu_has_gen_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("f16c");
  }();
  return ok;
}
#else
bool cpu_has_gen_avx2() { return false; }
#endif

using gen::Chunk;
using gen::Dims;
using gen::Params;

constexpr const char* kOp = gen::kGenerateOp;

// ---------------------------------------------------------------------------------------------------
// generic path: gen::step with a team of one
// ---------------------------------------------------------------------------------------------------

struct CpuExec {
  int rank = 0, size = 1;
  void sync() {}
  // WT: float, c10::Half or c10::BFloat16 (widened to float exactly; float accumulation)
  template <class WT>
  void matvec(const WT* W, int ld, int n_out, const float* const* xs, int n_seg, int seg_len, float* y) {
    for (int o = 0; o < n_out; ++o) y[o] = 0.f;
    for (int g = 0; g < n_seg; ++g) {
      const float* xg = xs[g];
      for (int i = 0; i < seg_len; ++i) {
        const float xv = xg[i];
        const WT* w = W + (int64_t)(g * seg_len + i) * ld;
        for (int o = 0; o < n_out; ++o) y[o] += xv * static_cast<float>(w[o]);
      }
    }
  }
  int sample(const float* logits, int n, float u) { return gen::sample_sequential(logits, n, u); }
};

template <class WT>
void run_generic(const Params<WT>& P, const Chunk& c, int64_t b0, int64_t b1) {
  const Dims& D = P.dims;
  std::vector<float> buf(2 * D.n_out() + D.n_gate() + D.n_dil + D.n_skp + D.n_post + D.n_quant);
  gen::Scratch s;
  s.acc = buf.data();
  s.h = s.acc + D.n_out();
  s.gate = s.h + D.n_gate();
  s.y = s.gate + D.n_dil;
  s.z = s.y + D.n_out();
  s.post = s.z + D.n_skp;
  s.logits = s.post + D.n_post;
  CpuExec ex;
  for (int64_t b = b0; b < b1; ++b) {
    float* queue = c.queues + b * P.q_rows * D.n_res;
    int x = (int)c.x_prev[b];
    for (int64_t i = 0; i < c.S; ++i) {
      const int64_t bi = b * c.S + i;
      x = gen::step(ex, P, c.cond + bi * D.cond_stride(), queue, s, x, c.t0 + i, c.u[bi],
                    c.forced ? c.forced[bi] : -1, c.logits ? c.logits + bi * D.n_quant : nullptr);
      c.samples[bi] = x;
    }
    c.x_prev[b] = x;
  }
}

// ---------------------------------------------------------------------------------------------------
// avx2 path
// ---------------------------------------------------------------------------------------------------
#if WN_HAVE_X86

// gate[c] = tanh(h[c]) * sigmoid(h[nd + c]) with one division:
//   tanh(a) sigmoid(b) = (e^2a - 1) / ((e^2a + 1)(1 + e^-b)),  a clamped to [-9, 9] (tanh(9) rounds to
//   1 in float), b to [-30, 30] (so the denominator stays finite); absolute error ~1e-7.
WN_GEN void gate_avx2(const float* h, int nd, float* gate) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 a_max = _mm256_set1_ps(9.f), b_max = _mm256_set1_ps(30.f);
  int c = 0;
  for (; c + 8 <= nd; c += 8) {
    __m256 a = _mm256_loadu_ps(h + c), b = _mm256_loadu_ps(h + nd + c);
    a = _mm256_max_ps(_mm256_min_ps(a, a_max), _mm256_sub_ps(_mm256_setzero_ps(), a_max));
    b = _mm256_max_ps(_mm256_min_ps(b, b_max), _mm256_sub_ps(_mm256_setzero_ps(), b_max));
    const __m256 ea = exp8(_mm256_add_ps(a, a));
    const __m256 eb = exp8(_mm256_sub_ps(_mm256_setzero_ps(), b));
    const __m256 den = _mm256_mul_ps(_mm256_add_ps(ea, one), _mm256_add_ps(eb, one));
    _mm256_storeu_ps(gate + c, _mm256_div_ps(_mm256_sub_ps(ea, one), den));
  }
  for (; c < nd; ++c) gate[c] = gen::gate_unit(h[c], h[nd + c]);
}

// gen::sample_sequential with the exponentials computed 8 at a time (same summation order).
WN_GEN int sample_avx2(const float* l, int n, float u, float* e) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int k = 0;
  for (; k + 8 <= n; k += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(l + k));
  alignas(32) float mm[8];
  _mm256_store_ps(mm, mv);
  float m = mm[0];
  for (int j = 1; j < 8; ++j) m = fmaxf(m, mm[j]);
  for (int j = k; j < n; ++j) m = fmaxf(m, l[j]);
  const __m256 mb = _mm256_set1_ps(m);
  for (k = 0; k + 8 <= n; k += 8) _mm256_storeu_ps(e + k, exp8(_mm256_sub_ps(_mm256_loadu_ps(l + k), mb)));
  for (; k < n; ++k) e[k] = expf(l[k] - m);
  return gen::sample_from_exps(e, n, u);
}

// Weight matrices repacked for the tiles: 16-column panels, each panel's rows contiguous, so a tile
// streams its weights sequentially (the input-major layout would make it stride by the row length;
// measured 1.2-1.5x faster on Zen 3). Element (r, c) of a rows x cols matrix is at
// ((c / 16) * rows + r) * 16 + c % 16; the last panel is zero-padded. Packed once per op call, in the
// weights' own type WT: float, c10::Half (fp16, widened by F16C's vcvtph2ps) or c10::BFloat16 (bf16,
// widened exactly by a 16-bit shift, plain AVX2). Products and sums are float32 whatever WT.
// bf16 panels interleave their two 8-column halves (column j at lane 2j, column 8 + j at lane 2j + 1), so
// one 32-byte load widens to both halves with a shift and a mask (no cross-lane shuffle); tiles start at
// multiples of 16 columns (tile_rows), so a tile's even vectors are panel halves 0 and odd ones halves 1.
constexpr int kPanel = 16;

template <class WT>
constexpr int panel_lane(int j) {
  if constexpr (std::is_same_v<WT, c10::BFloat16>) return j < 8 ? 2 * j : 2 * (j - 8) + 1;
  return j;
}

// Where element (r, c) of a packed rows x cols matrix lives.
template <class WT>
int64_t packed_index(int rows, int r, int c) {
  return ((int64_t)(c / kPanel) * rows + r) * kPanel + panel_lane<WT>(c % kPanel);
}

template <class WT>
struct PackedMat {
  const WT* p;
  int rows, cols;
};

int64_t packed_size(int rows, int cols) { return (int64_t)(cols + kPanel - 1) / kPanel * kPanel * rows; }

// Columns [c0, c0 + cols) of the rows x ld source (rows r0.. r0 + rows).
template <class WT>
PackedMat<WT> pack(const WT* src, int64_t ld, int rows, int cols, WT* dst) {
  const int panels = (cols + kPanel - 1) / kPanel;
  for (int pn = 0; pn < panels; ++pn)
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < kPanel; ++j) {
        const int c = pn * kPanel + j;
        dst[packed_index<WT>(rows, r, c)] = c < cols ? src[(int64_t)r * ld + c] : WT(0.f);
      }
  return {dst, rows, cols};
}

template <class WT>
struct PackedModel {
  std::vector<WT> buf;
  std::vector<PackedMat<WT>> dil, out;  // per layer; the last layer's `out` has the skip columns only
  PackedMat<WT> post1, post2;
};

template <class WT>
void pack_model(const Params<WT>& P, PackedModel<WT>& M) {
  const Dims& D = P.dims;
  const int nr = D.n_res, ng = D.n_gate(), nd = D.n_dil, no = D.n_out(), L = D.n_layers;
  const int kr = D.n_kern * nr;
  int64_t total = packed_size(D.n_skp, D.n_post) + packed_size(D.n_post, D.n_quant);
  for (int l = 0; l < L; ++l) total += packed_size(kr, ng) + packed_size(nd, l == L - 1 ? D.n_skp : no);
  M.buf.resize(total);
  WT* dst = M.buf.data();
  for (int l = 0; l < L; ++l) {
    M.dil.push_back(pack(P.w_dil + (int64_t)l * kr * ng, ng, kr, ng, dst));
    dst += packed_size(kr, ng);
    const bool last = l == L - 1;
    M.out.push_back(pack(P.w_out + (int64_t)l * nd * no + (last ? nr : 0), no, nd, last ? D.n_skp : no, dst));
    dst += packed_size(nd, last ? D.n_skp : no);
  }
  M.post1 = pack(P.w_post1, D.n_post, D.n_skp, D.n_post, dst);
  dst += packed_size(D.n_skp, D.n_post);
  M.post2 = pack(P.w_post2, D.n_quant, D.n_post, D.n_quant, dst);
}

// The 8 weights of a panel row's half `odd` as float32; p points at that half (panel row + 8 odd).
template <class WT>
WN_GEN inline __m256 load8(const WT* p, bool odd) {
  if constexpr (std::is_same_v<WT, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<WT, c10::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    static_assert(std::is_same_v<WT, c10::BFloat16>);
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd ? p - 8 : p));  // the whole row
    return _mm256_castsi256_ps(odd ? _mm256_and_si256(w, _mm256_set1_epi32((int)0xFFFF0000u))
                                   : _mm256_slli_epi32(w, 16));
  }
}

// ys[b][col + o] += sum_r W(r, col + o) x_b(r),  o < 8 NV, b < MB; x_b = [xs[b n_seg] ... xs[b n_seg + n_seg-1]]
// (segments of seg_len rows each); col is a multiple of 16.
template <int MB, int NV, class WT>
WN_GEN inline void tile(const PackedMat<WT>& W, int n_seg, int seg_len, const float* const* xs, float* const* ys,
                        int col) {
  __m256 acc[MB][NV];
  const WT* wv[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v)
    wv[v] = W.p + (int64_t)((col + 8 * v) / kPanel) * W.rows * kPanel + (col + 8 * v) % kPanel;
#pragma GCC unroll 4
  for (int b = 0; b < MB; ++b)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[b][v] = _mm256_loadu_ps(ys[b] + col + 8 * v);
  for (int g = 0; g < n_seg; ++g) {
    const float* xg[MB];
#pragma GCC unroll 4
    for (int b = 0; b < MB; ++b) xg[b] = xs[b * n_seg + g];
    const int64_t r0 = (int64_t)g * seg_len * kPanel;
    for (int i = 0; i < seg_len; ++i) {
      __m256 w[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) w[v] = load8(wv[v] + r0 + (int64_t)i * kPanel, v & 1);
#pragma GCC unroll 4
      for (int b = 0; b < MB; ++b) {
        const __m256 xb = _mm256_broadcast_ss(xg[b] + i);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[b][v] = _mm256_fmadd_ps(xb, w[v], acc[b][v]);
      }
    }
  }
#pragma GCC unroll 4
  for (int b = 0; b < MB; ++b)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(ys[b] + col + 8 * v, acc[b][v]);
}

// MB items, columns [0, n_cols): widest tiles first, then narrower ones, then a scalar tail.
template <int MB, class WT>
WN_GEN void tile_rows(const PackedMat<WT>& W, int n_cols, int n_seg, int seg_len, const float* const* xs,
                      float* const* ys) {
  constexpr int NV = MB == 1 ? 8 : (MB == 2 ? 4 : 2);  // <= 8 accumulators + weights in 16 registers
  int c = 0;  // every tile starts at a multiple of 16 columns (64, 32, 16 wide, then one of 8 at most)
  for (; c + 8 * NV <= n_cols; c += 8 * NV) tile<MB, NV>(W, n_seg, seg_len, xs, ys, c);
  if constexpr (NV > 4) {
    for (; c + 32 <= n_cols; c += 32) tile<MB, 4>(W, n_seg, seg_len, xs, ys, c);
  }
  if constexpr (NV > 2) {
    for (; c + 16 <= n_cols; c += 16) tile<MB, 2>(W, n_seg, seg_len, xs, ys, c);
  }
  for (; c + 8 <= n_cols; c += 8) tile<MB, 1>(W, n_seg, seg_len, xs, ys, c);
  for (; c < n_cols; ++c) {
    const WT* wc = W.p + packed_index<WT>(W.rows, 0, c);
    for (int b = 0; b < MB; ++b) {
      float a = ys[b][c];
      for (int g = 0; g < n_seg; ++g)
        for (int i = 0; i < seg_len; ++i)
          a += xs[b * n_seg + g][i] * static_cast<float>(wc[(int64_t)(g * seg_len + i) * kPanel]);
      ys[b][c] = a;
    }
  }
}

// ys[b][o] += W^T [xs[b n_seg]; ...; xs[b n_seg + n_seg - 1]],  o < n_cols <= W.cols,  for nb items.
template <class WT>
WN_GEN void matmul(const PackedMat<WT>& W, int n_cols, int n_seg, int seg_len, int nb, const float* const* xs,
                   float* const* ys) {
  int b = 0;
  for (; b + 4 <= nb; b += 4) tile_rows<4>(W, n_cols, n_seg, seg_len, xs + b * n_seg, ys + b);
  switch (nb - b) {
    case 3: tile_rows<3>(W, n_cols, n_seg, seg_len, xs + b * n_seg, ys + b); break;
    case 2: tile_rows<2>(W, n_cols, n_seg, seg_len, xs + b * n_seg, ys + b); break;
    case 1: tile_rows<1>(W, n_cols, n_seg, seg_len, xs + b * n_seg, ys + b); break;
    default: break;
  }
}

template <class WT>
WN_GEN void run_avx2(const Params<WT>& P, const PackedModel<WT>& M, const Chunk& c, int64_t b0, int64_t b1) {
  const Dims& D = P.dims;
  const int nb = (int)(b1 - b0), nr = D.n_res, nd = D.n_dil, ng = D.n_gate(), no = D.n_out(), K = D.n_kern;
  const int64_t qstride = P.q_rows * nr;
  std::vector<float> buf((size_t)nb * (no + ng + nd + D.n_skp + D.n_post + D.n_quant));
  float* acc = buf.data();                 // (nb, no)   [x | skip]
  float* h = acc + (size_t)nb * no;        // (nb, ng)
  float* gate = h + (size_t)nb * ng;       // (nb, nd)
  float* z = gate + (size_t)nb * nd;       // (nb, n_skp)
  float* post = z + (size_t)nb * D.n_skp;  // (nb, n_post)
  float* lg = post + (size_t)nb * D.n_post;  // (nb, n_quant)
  std::vector<const float*> xs((size_t)nb * K);
  std::vector<float*> ys(nb);
  std::vector<int> cur(nb);
  std::vector<float> exps(D.n_quant);
  for (int j = 0; j < nb; ++j) cur[j] = (int)c.x_prev[b0 + j];

  for (int64_t i = 0; i < c.S; ++i) {
    const int64_t t = c.t0 + i;
    bool need_out = c.logits != nullptr;
    for (int j = 0; j < nb; ++j) need_out = need_out || !c.forced || c.forced[(b0 + j) * c.S + i] < 0;
    for (int j = 0; j < nb; ++j) {
      float* a = acc + (size_t)j * no;
      std::memcpy(a, P.embed + (int64_t)cur[j] * nr, sizeof(float) * nr);
      std::fill(a + nr, a + no, 0.f);
    }
    for (int l = 0; l < D.n_layers; ++l) {
      const int d = P.dil[l];
      const int64_t Q = (int64_t)(K - 1) * d;
      const int64_t row_now = P.qoff[l] + gen::queue_slot(t, 0, Q);
      const bool last = l == D.n_layers - 1;
      if (last && !need_out) {
        for (int j = 0; j < nb; ++j)
          std::memcpy(c.queues + (b0 + j) * qstride + row_now * nr, acc + (size_t)j * no, sizeof(float) * nr);
        continue;
      }
      for (int j = 0; j < nb; ++j) {
        const float* q = c.queues + (b0 + j) * qstride;
        for (int k = 0; k < K - 1; ++k)
          xs[j * K + k] = q + (P.qoff[l] + gen::queue_slot(t, (int64_t)(K - 1 - k) * d, Q)) * nr;
        xs[j * K + K - 1] = acc + (size_t)j * no;
        std::memcpy(h + (size_t)j * ng, c.cond + ((b0 + j) * c.S + i) * D.cond_stride() + (int64_t)l * ng,
                    sizeof(float) * ng);
        ys[j] = h + (size_t)j * ng;
      }
      matmul(M.dil[l], ng, K, nr, nb, xs.data(), ys.data());

      const int col0 = last ? nr : 0;
      const int ncol = (need_out ? no : nr) - col0;
      const float* bl = P.b_out + (int64_t)l * no + col0;
      for (int j = 0; j < nb; ++j) {
        gate_avx2(h + (size_t)j * ng, nd, gate + (size_t)j * nd);
        float* a = acc + (size_t)j * no;
        std::memcpy(c.queues + (b0 + j) * qstride + row_now * nr, a, sizeof(float) * nr);
        for (int o = 0; o < ncol; ++o) a[col0 + o] += bl[o];
        xs[j] = gate + (size_t)j * nd;
        ys[j] = a + col0;
      }
      matmul(M.out[l], ncol, 1, nd, nb, xs.data(), ys.data());
    }
    if (need_out) {
      for (int j = 0; j < nb; ++j) {
        const float* skip = acc + (size_t)j * no + nr;
        float* zj = z + (size_t)j * D.n_skp;
        for (int o = 0; o < D.n_skp; ++o) zj[o] = gen::relu(skip[o]);
        std::memcpy(post + (size_t)j * D.n_post, P.b_post1, sizeof(float) * D.n_post);
        xs[j] = zj;
        ys[j] = post + (size_t)j * D.n_post;
      }
      matmul(M.post1, D.n_post, 1, D.n_skp, nb, xs.data(), ys.data());
      for (int j = 0; j < nb; ++j) {
        float* pj = post + (size_t)j * D.n_post;
        for (int o = 0; o < D.n_post; ++o) pj[o] = gen::relu(pj[o]);
        std::memcpy(lg + (size_t)j * D.n_quant, P.b_post2, sizeof(float) * D.n_quant);
        xs[j] = pj;
        ys[j] = lg + (size_t)j * D.n_quant;
      }
      matmul(M.post2, D.n_quant, 1, D.n_post, nb, xs.data(), ys.data());
    }
    for (int j = 0; j < nb; ++j) {
      const int64_t bi = (b0 + j) * c.S + i;
      const int64_t f = c.forced ? c.forced[bi] : -1;
      const float* lj = lg + (size_t)j * D.n_quant;
      if (c.logits) std::memcpy(c.logits + bi * D.n_quant, lj, sizeof(float) * D.n_quant);
      cur[j] = f >= 0 ? (int)f : sample_avx2(lj, D.n_quant, c.u[bi], exps.data());
      c.samples[bi] = cur[j];
    }
  }
  for (int j = 0; j < nb; ++j) c.x_prev[b0 + j] = cur[j];
}

// ---------------------------------------------------------------------------------------------------
// avx2 path, one item on a team of threads (batch 1 on several cores)
//
// Each of the T threads owns a slice of every matrix, packed for it alone (so each core keeps its
// 1/T of the weights in its own L2), and every thread holds the whole state vector x:
//   w_dil   columns: its gate channels [g0, g1) of the tanh half and of the sigmoid half, so it
//           computes its own gate channels with no exchange;
//   w_out   rows [g0, g1) (its gate channels): partial [residual | skip] sums, from its own gates;
//   post1   columns [p0, p1); post2 rows [p0, p1): partial logits.
// One barrier per layer: after it every thread adds the T residual partials (in thread order, so all
// hold the same x) and thread 0 writes the layer's input into the queue (its taps were read before the
// barrier); skip partials are summed after the last layer, logit partials after one more barrier, and
// every thread draws the same sample. Residual partials alternate between two buffers by barrier
// phase, so a thread ahead by one phase never overwrites what another is still reading. Sums are
// grouped by thread, so results depend on T (float rounding; tests compare to the reference engine).
// ---------------------------------------------------------------------------------------------------

// A spin barrier for a team that passes one at a time: thread r publishes the phase it reached and
// waits until every other thread has reached it. cancel() releases every waiter for good
// (arrive_and_wait then returns false): the team's start-up uses it when a thread cannot be created,
// so the members already running return instead of waiting for a rank that will never arrive.
class TeamBarrier {
 public:
  explicit TeamBarrier(int n) : flags_(n) {}
  bool arrive_and_wait(int rank, int64_t phase) {
    flags_[rank].v.store(phase, std::memory_order_release);
    for (int r = 0; r < (int)flags_.size(); ++r) {
      if (r == rank) continue;
      for (int spins = 0; flags_[r].v.load(std::memory_order_acquire) < phase; ++spins) {
        if (cancelled_.v.load(std::memory_order_relaxed)) return false;
        if (spins < 4000) {
          _mm_pause();
        } else {
          std::this_thread::yield();  // oversubscribed (more threads than free cores): let the others run
        }
      }
    }
    return !cancelled_.v.load(std::memory_order_relaxed);
  }
  void cancel() { cancelled_.v.store(true, std::memory_order_relaxed); }

 private:
  struct alignas(64) Flag {
    std::atomic<int64_t> v{0};
  };
  struct alignas(64) Cancel {
    std::atomic<bool> v{false};
  };
  std::vector<Flag> flags_;
  Cancel cancelled_;
};

template <class WT>
struct TeamSlice {
  int g0, g1, p0, p1;  // gate channels, post1 outputs
  std::vector<WT> buf;
  std::vector<PackedMat<WT>> dil, res, skp;  // per layer (res: all but the last)
  PackedMat<WT> post1, post2;
  std::vector<float> scratch;  // the member's vectors (allocated before the team starts)
};

// Columns `cols` (indices) of a rows x ld matrix, packed.
template <class WT>
PackedMat<WT> pack_cols(const WT* src, int64_t ld, int rows, const std::vector<int>& cols, WT* dst) {
  const int n = (int)cols.size();
  for (int c = 0; c < packed_size(1, n); ++c)
    for (int r = 0; r < rows; ++r) dst[packed_index<WT>(rows, r, c)] = c < n ? src[(int64_t)r * ld + cols[c]] : WT(0.f);
  return {dst, rows, n};
}

template <class WT>
void pack_slice(const Params<WT>& P, int t, int T, TeamSlice<WT>& S) {
  const Dims& D = P.dims;
  const int nr = D.n_res, ng = D.n_gate(), nd = D.n_dil, no = D.n_out(), L = D.n_layers, kr = D.n_kern * nr;
  S.g0 = (int)((int64_t)t * nd / T), S.g1 = (int)((int64_t)(t + 1) * nd / T);
  S.p0 = (int)((int64_t)t * D.n_post / T), S.p1 = (int)((int64_t)(t + 1) * D.n_post / T);
  const int n = S.g1 - S.g0, np = S.p1 - S.p0;
  std::vector<int> gcols;
  for (int c = S.g0; c < S.g1; ++c) gcols.push_back(c);
  for (int c = S.g0; c < S.g1; ++c) gcols.push_back(nd + c);
  std::vector<int> pcols;
  for (int c = S.p0; c < S.p1; ++c) pcols.push_back(c);
  int64_t total = packed_size(D.n_skp, np) + packed_size(np, D.n_quant);
  for (int l = 0; l < L; ++l) total += packed_size(kr, 2 * n) + packed_size(n, nr) + packed_size(n, D.n_skp);
  S.buf.resize(total);
  WT* dst = S.buf.data();
  for (int l = 0; l < L; ++l) {
    S.dil.push_back(pack_cols(P.w_dil + (int64_t)l * kr * ng, ng, kr, gcols, dst));
    dst += packed_size(kr, 2 * n);
    const WT* w_rows = P.w_out + ((int64_t)l * nd + S.g0) * no;  // rows [g0, g1) of layer l's w_out
    if (l < L - 1) {
      S.res.push_back(pack(w_rows, no, n, nr, dst));
      dst += packed_size(n, nr);
    }
    S.skp.push_back(pack(w_rows + nr, no, n, D.n_skp, dst));
    dst += packed_size(n, D.n_skp);
  }
  S.post1 = pack_cols(P.w_post1, D.n_post, D.n_skp, pcols, dst);
  dst += packed_size(D.n_skp, np);
  S.post2 = pack(P.w_post2 + (int64_t)S.p0 * D.n_quant, D.n_quant, np, D.n_quant, dst);
  S.scratch.resize(nr + 3 * n + D.n_skp + np + 2 * D.n_quant);
}

// Shared by the team: partial sums, published before a barrier and read after it. Each thread's row
// starts on its own 64-byte cache line (rows padded to 16 floats, the block aligned), so a thread
// writing its partials never invalidates the line another thread is writing.
struct TeamRows {
  int64_t stride = 0;  // floats from one row to the next (a multiple of 16)
  std::vector<float> buf;
  TeamRows(int64_t rows, int64_t n) : stride((n + 15) / 16 * 16), buf((size_t)(rows * stride + 16)) {}
  float* row(int64_t r) {
    const auto base = reinterpret_cast<std::uintptr_t>(buf.data());
    return reinterpret_cast<float*>((base + 63) & ~std::uintptr_t(63)) + r * stride;
  }
};

struct TeamShared {
  int T;
  TeamRows res;     // (2 T, n_res)  residual partials of thread t in row (phase parity) T + t
  TeamRows skip;    // (T, n_skp)    skip partials (read after the last layer's barrier)
  TeamRows logits;  // (T, n_quant)  logit partials
};

template <class WT>
WN_GEN void run_team_member(const Params<WT>& P, const TeamSlice<WT>& S, TeamShared& sh, TeamBarrier& bar,
                            const Chunk& c, int t) {
  const Dims& D = P.dims;
  const int nr = D.n_res, nd = D.n_dil, no = D.n_out(), K = D.n_kern, T = sh.T, nq = D.n_quant;
  const int n = S.g1 - S.g0, np = S.p1 - S.p0;
  float* x = const_cast<float*>(S.scratch.data());  // (nr) the layer input, the same on every thread
  float* h = x + nr;            // (2n)     own gate pre-activations [tanh | sigmoid]
  float* gate = h + 2 * n;      // (n)
  float* z = gate + n;          // (n_skp)  relu(skip)
  float* post = z + D.n_skp;    // (np)
  float* lg = post + np;        // (nq)
  float* exps = lg + nq;        // (nq)
  float* skip = sh.skip.row(t);
  float* lpart = sh.logits.row(t);
  const float* xs[gen::kMaxKern];
  int64_t phase = 0;
  int cur = (int)c.x_prev[0];

  for (int64_t i = 0; i < c.S; ++i) {
    const int64_t tt = c.t0 + i;
    const int64_t f = c.forced ? c.forced[i] : -1;
    const bool need_out = c.logits != nullptr || f < 0;
    std::memcpy(x, P.embed + (int64_t)cur * nr, sizeof(float) * nr);
    if (need_out) std::fill(skip, skip + D.n_skp, 0.f);
    const float* cond = c.cond + i * D.cond_stride();
    for (int l = 0; l < D.n_layers; ++l) {
      const int d = P.dil[l];
      const int64_t Q = (int64_t)(K - 1) * d;
      float* q_now = c.queues + (P.qoff[l] + gen::queue_slot(tt, 0, Q)) * nr;
      const bool last = l == D.n_layers - 1;
      if (last && !need_out) {
        if (t == 0) std::memcpy(q_now, x, sizeof(float) * nr);
        continue;
      }
      for (int k = 0; k < K - 1; ++k)
        xs[k] = c.queues + (P.qoff[l] + gen::queue_slot(tt, (int64_t)(K - 1 - k) * d, Q)) * nr;
      xs[K - 1] = x;
      const float* cl = cond + (int64_t)l * 2 * nd;
      std::memcpy(h, cl + S.g0, sizeof(float) * n);
      std::memcpy(h + n, cl + nd + S.g0, sizeof(float) * n);
      float* yh = h;
      matmul(S.dil[l], 2 * n, K, nr, 1, xs, &yh);
      gate_avx2(h, n, gate);
      const float* gp = gate;
      const float* bl = P.b_out + (int64_t)l * no;
      float* res = sh.res.row((phase & 1) * T + t);
      if (!last) {
        if (t == 0) {
          std::memcpy(res, bl, sizeof(float) * nr);
        } else {
          std::fill(res, res + nr, 0.f);
        }
        matmul(S.res[l], nr, 1, n, 1, &gp, &res);
      }
      if (need_out) {
        if (t == 0)
          for (int o = 0; o < D.n_skp; ++o) skip[o] += bl[nr + o];
        matmul(S.skp[l], D.n_skp, 1, n, 1, &gp, &skip);
      }
      if (!bar.arrive_and_wait(t, ++phase)) return;  // cancelled: the team did not start
      if (t == 0) std::memcpy(q_now, x, sizeof(float) * nr);  // every thread has read the taps
      if (!last) {
        for (int r = 0; r < T; ++r) {
          const float* rp = sh.res.row(((phase - 1) & 1) * T + r);
          for (int o = 0; o < nr; ++o) x[o] += rp[o];
        }
      }
    }
    int y = (int)f;
    if (need_out) {
      for (int o = 0; o < D.n_skp; ++o) {
        float s = 0.f;
        for (int r = 0; r < T; ++r) s += sh.skip.row(r)[o];
        z[o] = gen::relu(s);
      }
      std::memcpy(post, P.b_post1 + S.p0, sizeof(float) * np);
      const float* zp = z;
      float* pp = post;
      matmul(S.post1, np, 1, D.n_skp, 1, &zp, &pp);
      for (int o = 0; o < np; ++o) post[o] = gen::relu(post[o]);
      if (t == 0) {
        std::memcpy(lpart, P.b_post2, sizeof(float) * nq);
      } else {
        std::fill(lpart, lpart + nq, 0.f);
      }
      const float* pc = post;
      matmul(S.post2, nq, 1, np, 1, &pc, &lpart);
      if (!bar.arrive_and_wait(t, ++phase)) return;
      std::fill(lg, lg + nq, 0.f);
      for (int r = 0; r < T; ++r) {
        const float* lp = sh.logits.row(r);
        for (int o = 0; o < nq; ++o) lg[o] += lp[o];
      }
      if (t == 0 && c.logits) std::memcpy(c.logits + i * nq, lg, sizeof(float) * nq);
      if (f < 0) y = sample_avx2(lg, nq, c.u[i], exps);
    }
    if (t == 0) c.samples[i] = y;
    cur = y;
  }
  if (t == 0) c.x_prev[0] = cur;
}

template <class WT>
void run_team(const Params<WT>& P, const Chunk& c, int T) {
  const Dims& D = P.dims;
  std::vector<TeamSlice<WT>> slices(T);
  for (int t = 0; t < T; ++t) pack_slice(P, t, T, slices[t]);
  TeamShared sh{T, TeamRows(2 * T, D.n_res), TeamRows(T, D.n_skp), TeamRows(T, D.n_quant)};
  TeamBarrier bar(T);
  std::vector<std::thread> workers;
  try {
    for (int t = 1; t < T; ++t) workers.emplace_back([&, t] { run_team_member(P, slices[t], sh, bar, c, t); });
  } catch (...) {  // e.g. std::system_error: no more threads. Release the started members, then report.
    bar.cancel();
    for (auto& w : workers) w.join();
    throw;
  }
  run_team_member(P, slices[0], sh, bar, c, 0);
  for (auto& w : workers) w.join();
}

// Threads of the team for B items on `threads` threads: batch 1 on >= 2 threads (each takes >= 4 gate
// channels and post1 outputs); otherwise 1 (items split across threads instead).
int team_size(const Dims& D, int64_t B, int threads) {
  if (B != 1 || threads < 2) return 1;
  return std::max(1, std::min({threads, D.n_dil / 4, D.n_post / 4}));
}

#endif  // WN_HAVE_X86

// Runs f(b0, b1) on at::get_num_threads() threads, each taking one contiguous block of the B items
// for the whole chunk (no synchronisation inside). Plain std::thread: one fan-out per chunk (thousands
// of steps) makes thread start-up negligible, and it does not depend on the build's OpenMP flags.
template <class F>
void parallel_items(int64_t B, const F& f) {
  const int64_t nt = std::min<int64_t>(B, std::max(1, at::get_num_threads()));
  if (nt <= 1) {
    f(0, B);
    return;
  }
  const int64_t per = (B + nt - 1) / nt;
  std::vector<std::thread> workers;
  std::exception_ptr error;
  std::mutex error_mutex;
  for (int64_t b0 = per; b0 < B; b0 += per) {
    workers.emplace_back([&, b0] {
      try {
        f(b0, std::min(B, b0 + per));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        error = std::current_exception();
      }
    });
  }
  try {
    f(0, std::min(B, per));
  } catch (...) {
    std::lock_guard<std::mutex> lock(error_mutex);
    error = std::current_exception();
  }
  for (auto& w : workers) w.join();
  if (error) std::rethrow_exception(error);
}

// "auto" -> the best path this CPU runs (the same for every weight dtype); an explicit request is checked.
std::string resolve_path(const std::string& request) {
  if (request == "auto") return cpu_has_gen_avx2() ? "avx2" : "generic";
  if (request == "generic") return request;
  if (request == "avx2") {
    TORCH_CHECK(cpu_has_gen_avx2(), kOp, ": path 'avx2' requested but this CPU lacks AVX2/FMA/F16C "
                "(or the build is not x86-64); use 'auto' or 'generic'");
    return request;
  }
  TORCH_CHECK(false, kOp, ": unknown path '", request, "' (expected 'auto', 'generic' or 'avx2')");
  return request;
}

template <class WT>
void generate_cpu(const gen::Problem& pr, const Params<WT>& P, const Chunk& c, bool avx2) {
#if WN_HAVE_X86
  if (avx2) {
    const int team = team_size(P.dims, pr.B, at::get_num_threads());
    if (team > 1) {
      run_team(P, c, team);
      return;
    }
    PackedModel<WT> M;
    pack_model(P, M);
    parallel_items(pr.B, [&](int64_t b0, int64_t b1) { run_avx2(P, M, c, b0, b1); });
    return;
  }
#endif
  (void)avx2;
  parallel_items(pr.B, [&](int64_t b0, int64_t b1) { run_generic(P, c, b0, b1); });
}

std::tuple<at::Tensor, at::Tensor> wavenet_generate_cpu(
    const at::Tensor& embed, const at::Tensor& w_dil, const at::Tensor& w_out, const at::Tensor& b_out,
    const at::Tensor& w_post1, const at::Tensor& b_post1, const at::Tensor& w_post2, const at::Tensor& b_post2,
    at::IntArrayRef dilations, const at::Tensor& cond, const at::Tensor& u, const std::optional<at::Tensor>& forced,
    at::Tensor& queues, at::Tensor& x_prev, int64_t t0, bool want_logits, c10::string_view path) {
  const gen::Problem pr = gen::check_problem(embed, w_dil, w_out, b_out, w_post1, b_post1, w_post2, b_post2,
                                             dilations, cond, u, forced, queues, x_prev, t0);
  TORCH_CHECK(cond.device().is_cpu(), kOp, ": CPU kernel called with cond on ", cond.device());
  gen::check_classes(pr, forced, x_prev);
  const std::string which = resolve_path(std::string(path));
  at::Tensor samples = at::empty({pr.B, pr.S}, x_prev.options());
  at::Tensor logits = at::empty({want_logits ? pr.B : 0, pr.S, pr.dims.n_quant}, cond.options());
  if (pr.B == 0 || pr.S == 0) return {samples, logits};

  const Chunk c = gen::make_chunk(cond, u, forced, queues, x_prev, samples, logits, want_logits, pr.S, t0);
  const bool avx2 = which == "avx2";
#define WN_GENERATE_CPU(WT) \
  generate_cpu(pr, gen::make_params<WT>(pr, embed, w_dil, w_out, b_out, w_post1, b_post1, w_post2, b_post2), c, avx2)
  switch (w_dil.scalar_type()) {  // check_problem allows these three
    case at::kHalf: WN_GENERATE_CPU(c10::Half); break;
    case at::kBFloat16: WN_GENERATE_CPU(c10::BFloat16); break;
    default: WN_GENERATE_CPU(float); break;
  }
#undef WN_GENERATE_CPU
  return {samples, logits};
}

std::string wavenet_generate_cpu_path(const at::Tensor& like, c10::string_view request) {
  (void)like;
  return resolve_path(std::string(request));
}

}  // namespace

std::string cpu::wavenet_generate_path(const std::string& request) { return resolve_path(request); }

TORCH_LIBRARY_IMPL(wavenet_ae, CPU, m) {
  m.impl("wavenet_generate", &wavenet_generate_cpu);
  m.impl("wavenet_generate_cpu_path", &wavenet_generate_cpu_path);
}

}  // namespace wavenet_ae
