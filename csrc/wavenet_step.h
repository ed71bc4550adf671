// Incremental WaveNet generation: the per-sample math, shared by the C++ CPU engine
// (csrc/cpu/wavenet_generate.cpp) and the persistent CUDA engine (csrc/cuda/wavenet_generate.cu).
//
// One generation step for one batch item (fast-wavenet caching, Paine et al. 2016):
//
//   x      = embed[x_prev]                                        (n_res)
//   for layer l (dilation d, K = n_kern taps):
//     h    = cond_l + sum_k W_l,k x_l(t - (K-1-k) d)              (2 n_dil)  cond_l = lc/gc proj + bias
//     queue_l[t] = x_l(t)                                         ring buffer of (K-1) d past inputs
//     gate = tanh(h[:n_dil]) * sigmoid(h[n_dil:])                 (n_dil)
//     [x | skip] += W_out,l gate + b_out,l                        (n_res + n_skp; the last layer
//                                                                  has no residual columns)
//   logits = post2 relu(post1 relu(skip) + b1) + b2               (n_quant)
//   y      = forced >= 0 ? forced : inverse-CDF sample of softmax(logits) at u
//
// `step()` below is written once for a "team" of cooperating threads: an Exec object supplies its
// rank/size, a barrier, a matrix-vector product and the sampler. On the CPU the team is one thread
// (rank 0, size 1, no barrier): the CPU engine's `generic` path runs exactly the orchestration the
// CUDA kernel runs, so CPU tests cover the CUDA engine's logic (queue slots, taps, phases, sampling).
//
// Packed weight layout (prepared once, see wavenet_ae.generate.pack_decoder): every matrix is stored
// input-major, W[i][o] with outputs contiguous, so y = W^T x is a sum of rows scaled by x[i]
// (vector FMAs over o on the CPU, coalesced loads across threads o on the GPU).
//   embed  (n_quant, n_res)            f32
//   w_dil  (L, K, n_res, 2 n_dil)      WT   tap k multiplies x(t - (K-1-k) d)
//   w_out  (L, n_dil, n_res + n_skp)   WT   [residual | skip] columns
//   b_out  (L, n_res + n_skp)          f32
//   w_post1 (n_skp, n_post) WT, b_post1 (n_post) f32, w_post2 (n_post, n_quant) WT, b_post2 f32
// Queues: one (sum_l (K-1) d_l, n_res) f32 block per batch item; layer l owns rows
// [qoff[l], qoff[l] + (K-1) d_l); the input of step t lives in row qoff[l] + t mod (K-1) d_l.
//
// This header compiles with g++ and nvcc (WN_HD, csrc/host_device.h).
#pragma once

#include <math.h>
#include <stdint.h>

#include "host_device.h"

namespace wavenet_ae {
namespace gen {

constexpr int kMaxKern = 8;          // taps per dilated conv
constexpr int kMaxLayers = 64;       // dilated layers
constexpr int kSampleChunks = 32;    // the sampler's summation order (one chunk per CUDA lane)

struct Dims {
  int n_res, n_dil, n_skp, n_post, n_quant, n_kern, n_layers;
  WN_HD int n_gate() const { return 2 * n_dil; }
  WN_HD int n_out() const { return n_res + n_skp; }
  WN_HD int cond_stride() const { return n_layers * 2 * n_dil; }  // floats of conditioning per step
};

// Model pointers (device or host) and the queue geometry; passed by value to the CUDA kernel.
template <class WT>
struct Params {
  Dims dims;
  const float* embed;
  const WT* w_dil;
  const WT* w_out;
  const float* b_out;
  const WT* w_post1;
  const float* b_post1;
  const WT* w_post2;
  const float* b_post2;
  int dil[kMaxLayers];
  int64_t qoff[kMaxLayers];  // first queue row of each layer
  int64_t q_rows;            // rows of one item's queue block
};

// Per-item scratch vectors (shared memory on the GPU).
struct Scratch {
  float* acc;     // n_res + n_skp: current residual input x, then the running skip sum
  float* h;       // 2 n_dil
  float* gate;    // n_dil
  float* y;       // n_res + n_skp: matvec output before accumulation
  float* z;       // n_skp: relu(skip)
  float* post;    // n_post
  float* logits;  // n_quant
};

// Ring-buffer row of step `t - back` in a queue of Q rows (t >= 0; back <= Q).
WN_HD int64_t queue_slot(int64_t t, int64_t back, int64_t Q) {
  int64_t s = (t - back) % Q;
  return s < 0 ? s + Q : s;
}

WN_HD float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
WN_HD float gate_unit(float a, float b) { return tanhf(a) * sigmoid(b); }
WN_HD float relu(float x) { return x > 0.f ? x : 0.f; }

// ---------------------------------------------------------------------------------------------------
// Sampling: the smallest class k with  sum_{j<=k} e_j > u * sum_j e_j,  e_j = exp(l_j - max l),
// n - 1 when rounding leaves no such k. Sums are taken in kSampleChunks contiguous chunks: chunk sums
// left to right, and within a chunk left to right, so the sequential loop here and a CUDA warp (one
// chunk per lane, see csrc/cuda/wavenet_generate.cu) add in the same order.
// ---------------------------------------------------------------------------------------------------
WN_HD int chunk_begin(int c, int n) {
  const int per = (n + kSampleChunks - 1) / kSampleChunks;
  const int b = c * per;
  return b < n ? b : n;
}

WN_HD float chunk_max(const float* l, int c, int n) {
  float m = -INFINITY;
  for (int k = chunk_begin(c, n), e = chunk_begin(c + 1, n); k < e; ++k) m = fmaxf(m, l[k]);
  return m;
}

WN_HD float chunk_expsum(const float* l, int c, int n, float m) {
  float s = 0.f;
  for (int k = chunk_begin(c, n), e = chunk_begin(c + 1, n); k < e; ++k) s += expf(l[k] - m);
  return s;
}

// First k of chunk c whose running sum, added to `base` (the sum of the chunks before), exceeds
// `target`; -1 if none. Consistent with chunk_expsum: the last running sum is the chunk sum.
WN_HD int chunk_find(const float* l, int c, int n, float m, float base, float target) {
  float s = 0.f;
  for (int k = chunk_begin(c, n), e = chunk_begin(c + 1, n); k < e; ++k) {
    s += expf(l[k] - m);
    if (base + s > target) return k;
  }
  return -1;
}

// The same draw from precomputed e_j = exp(l_j - max l) (e.g. computed with vector instructions).
WN_HD int sample_from_exps(const float* e, int n, float u) {
  float sums[kSampleChunks];
  float total = 0.f;
  for (int c = 0; c < kSampleChunks; ++c) {
    float s = 0.f;
    for (int k = chunk_begin(c, n), end = chunk_begin(c + 1, n); k < end; ++k) s += e[k];
    sums[c] = s;
    total += s;
  }
  const float target = u * total;
  float base = 0.f;
  for (int c = 0; c < kSampleChunks; ++c) {
    if (base + sums[c] > target) {
      float s = 0.f;
      for (int k = chunk_begin(c, n), end = chunk_begin(c + 1, n); k < end; ++k) {
        s += e[k];
        if (base + s > target) return k;
      }
    }
    base += sums[c];
  }
  return n - 1;
}

WN_HD int sample_sequential(const float* l, int n, float u) {
  float m = -INFINITY;
  for (int c = 0; c < kSampleChunks; ++c) m = fmaxf(m, chunk_max(l, c, n));
  float sums[kSampleChunks];
  float total = 0.f;
  for (int c = 0; c < kSampleChunks; ++c) {
    sums[c] = chunk_expsum(l, c, n, m);
    total += sums[c];
  }
  const float target = u * total;
  float base = 0.f;
  for (int c = 0; c < kSampleChunks; ++c) {
    if (base + sums[c] > target) {
      const int k = chunk_find(l, c, n, m, base, target);
      if (k >= 0) return k;
    }
    base += sums[c];
  }
  return n - 1;
}

// ---------------------------------------------------------------------------------------------------
// One step for one batch item, executed by a team (see the top of this file).
//
// Exec interface:
//   int rank, size;                        this thread's index in the team, team size
//   void sync();                           barrier (no-op for a team of one)
//   void matvec(const WT* W, int ld, int n_out, const float* const* xs, int n_seg, int seg_len,
//               float* y);                 y[o] = sum_g sum_i W[(g seg_len + i) ld + o] xs[g][i],
//                                          o < n_out; y complete and visible to all on return;
//                                          may read xs only before its final barrier
//   int sample(const float* logits, int n, float u);   same result on every rank
//
// cond: this step's conditioning (L * 2 n_dil floats); queue: this item's queue block; t: absolute
// step index (selects queue rows); forced: the class to emit (>= 0) or -1 to sample with u;
// logits_out: n_quant floats to receive the logits, or nullptr. Returns the emitted class.
// When the class is forced and no logits are wanted, the skip path and the post-net are skipped
// (the teacher-forced history only has to fill the queues).
// ---------------------------------------------------------------------------------------------------
template <class Ex, class WT>
WN_HD int step(Ex& ex, const Params<WT>& P, const float* cond, float* queue, const Scratch& s,
               int x_prev, int64_t t, float u, int64_t forced, float* logits_out) {
  const Dims& D = P.dims;
  const int nr = D.n_res, nd = D.n_dil, ng = D.n_gate(), no = D.n_out(), K = D.n_kern;
  const bool need_out = logits_out != nullptr || forced < 0;
  float* x = s.acc;

  for (int c = ex.rank; c < no; c += ex.size) x[c] = c < nr ? P.embed[(int64_t)x_prev * nr + c] : 0.f;
  ex.sync();

  for (int l = 0; l < D.n_layers; ++l) {
    const int d = P.dil[l];
    const int64_t Q = (int64_t)(K - 1) * d;
    float* ql = queue + P.qoff[l] * nr;
    float* q_now = ql + queue_slot(t, 0, Q) * nr;  // also the row of t - (K-1) d, read first
    const bool last = l == D.n_layers - 1;
    if (last && !need_out) {  // the last layer only feeds the skip sum: just queue its input
      for (int c = ex.rank; c < nr; c += ex.size) q_now[c] = x[c];
      ex.sync();
      continue;
    }
    const float* xs[kMaxKern];
    for (int k = 0; k < K - 1; ++k) xs[k] = ql + queue_slot(t, (int64_t)(K - 1 - k) * d, Q) * nr;
    xs[K - 1] = x;
    ex.matvec(P.w_dil + (int64_t)l * K * nr * ng, ng, ng, xs, K, nr, s.h);

    const float* cl = cond + (int64_t)l * ng;
    for (int c = ex.rank; c < nd; c += ex.size) s.gate[c] = gate_unit(cl[c] + s.h[c], cl[nd + c] + s.h[nd + c]);
    for (int c = ex.rank; c < nr; c += ex.size) q_now[c] = x[c];  // taps were read inside matvec
    ex.sync();

    const int col0 = last ? nr : 0;               // the last layer has no residual output
    const int ncol = (need_out ? no : nr) - col0;  // history steps: residual columns only
    const float* gp = s.gate;
    ex.matvec(P.w_out + (int64_t)l * nd * no + col0, no, ncol, &gp, 1, nd, s.y);
    const float* bl = P.b_out + (int64_t)l * no + col0;
    for (int c = ex.rank; c < ncol; c += ex.size) x[col0 + c] += s.y[c] + bl[c];
    ex.sync();
  }
  if (!need_out) return (int)forced;

  for (int c = ex.rank; c < D.n_skp; c += ex.size) s.z[c] = relu(x[nr + c]);
  ex.sync();
  const float* zp = s.z;
  ex.matvec(P.w_post1, D.n_post, D.n_post, &zp, 1, D.n_skp, s.post);
  for (int c = ex.rank; c < D.n_post; c += ex.size) s.post[c] = relu(s.post[c] + P.b_post1[c]);
  ex.sync();
  const float* pp = s.post;
  ex.matvec(P.w_post2, D.n_quant, D.n_quant, &pp, 1, D.n_post, s.logits);
  for (int c = ex.rank; c < D.n_quant; c += ex.size) {
    s.logits[c] += P.b_post2[c];
    if (logits_out) logits_out[c] = s.logits[c];
  }
  ex.sync();
  if (forced >= 0) return (int)forced;
  return ex.sample(s.logits, D.n_quant, u);
}

}  // namespace gen
}  // namespace wavenet_ae
