// Incremental WaveNet generation, CUDA engine: a persistent kernel, one launch per chunk of steps.
//
// One thread block per batch item runs all steps of the chunk (in the spirit of nv-wavenet's
// single-block variant): the per-step math is gen::step from csrc/wavenet_step.h, the same code the
// CPU engine's `generic` path runs with a team of one, here with a team of kThreads threads:
//   * matvec: thread o computes output o (weights stored input-major, so the threads of a warp read
//     consecutive addresses); when there are more threads than outputs, `split` threads share an
//     output over interleaved inputs and the partial sums are added in shared memory;
//   * barriers: __syncthreads between the phases of a layer (matvec -> gate/queue -> matvec -> add);
//   * sampling: warp 0, one chunk of classes per lane, summed in the order of gen::sample_sequential.
// Scratch vectors live in shared memory; the weight matrices are staged into shared memory at kernel
// start when they fit (small models, or fp16/bf16 weights of mid-size ones), otherwise they are read
// from global memory where they stay L2-resident (the paper decoder is 3.4 MB in fp32, 1.7 MB in
// fp16). Queues live in global memory (one block per item, written and read by the same block).
// Weight matrices may be float32, float16 or bfloat16 (accumulation is always float32).
#include <algorithm>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch.cuh"
#include "wavenet_generate_host.h"
#include "wavenet_step.h"

namespace wavenet_ae {
namespace {

using gen::Chunk;
using gen::Dims;
using gen::Params;

using launch::kThreads;
static_assert(kThreads % 32 == 0 && kThreads >= 32, "whole warps; warp 0 samples");
constexpr const char* kOp = gen::kGenerateOp;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

struct CudaExec {
  int rank, size;
  float* partial;  // shared, >= max(size, 32) floats
  int* bcast;      // shared, 1 int

  __device__ __forceinline__ void sync() { __syncthreads(); }

  template <class WT>
  __device__ __forceinline__ void matvec(const WT* W, int ld, int n_out, const float* const* xs, int n_seg,
                                         int seg_len, float* y) {
    int split = size / n_out;
    split = split < 1 ? 1 : (split > seg_len ? seg_len : split);
    if (split == 1) {
      for (int o = rank; o < n_out; o += size) {
        float a = 0.f;
        for (int g = 0; g < n_seg; ++g) {
          const float* xg = xs[g];
          const WT* wg = W + (int64_t)g * seg_len * ld + o;
#pragma unroll 8
          for (int i = 0; i < seg_len; ++i) a += xg[i] * to_f(wg[(int64_t)i * ld]);
        }
        y[o] = a;
      }
      __syncthreads();
      return;
    }
    if (rank < split * n_out) {
      const int o = rank % n_out, p = rank / n_out;
      float a = 0.f;
      for (int g = 0; g < n_seg; ++g) {
        const float* xg = xs[g];
        const WT* wg = W + (int64_t)g * seg_len * ld + o;
#pragma unroll 4
        for (int i = p; i < seg_len; i += split) a += xg[i] * to_f(wg[(int64_t)i * ld]);
      }
      partial[p * n_out + o] = a;
    }
    __syncthreads();
    for (int o = rank; o < n_out; o += size) {
      float a = partial[o];
      for (int p = 1; p < split; ++p) a += partial[p * n_out + o];
      y[o] = a;
    }
    __syncthreads();
  }

  // gen::sample_sequential, one chunk per lane of warp 0; the result is broadcast to the block.
  __device__ __forceinline__ int sample(const float* l, int n, float u) {
    static_assert(gen::kSampleChunks == 32, "one sampling chunk per lane");
    if (rank < 32) {
      const int lane = rank;
      float m = gen::chunk_max(l, lane, n);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
      const float s = gen::chunk_expsum(l, lane, n, m);
      partial[lane] = s;
      __syncwarp();
      float total = 0.f, base = 0.f;
      for (int c = 0; c < 32; ++c) {  // left to right, as the sequential version
        if (c == lane) base = total;
        total += partial[c];
      }
      const float target = u * total;
      const unsigned mask = __ballot_sync(0xffffffffu, base + s > target);
      if (mask == 0u) {
        if (lane == 0) *bcast = n - 1;
      } else if (lane == __ffs(mask) - 1) {
        const int k = gen::chunk_find(l, lane, n, m, base, target);
        *bcast = k >= 0 ? k : n - 1;
      }
    }
    __syncthreads();
    const int y = *bcast;
    __syncthreads();  // partial/bcast may be rewritten right after
    return y;
  }
};

WN_HD int64_t round4(int64_t n) { return (n + 3) / 4 * 4; }              // floats, 16-byte alignment
WN_HD int64_t round16(int64_t bytes) { return (bytes + 15) / 16 * 16; }  // bytes, 16-byte alignment

WN_HD int64_t scratch_floats(const Dims& D, int threads) {
  return round4(D.n_out()) * 2 + round4(D.n_gate()) + round4(D.n_dil) + round4(D.n_skp) + round4(D.n_post) +
         round4(D.n_quant) + round4(threads > 32 ? threads : 32) + 4;
}

// The weight matrices staged into shared memory, in staging order.
enum class Staged { kDil, kOut, kPost1, kPost2 };

WN_HD int64_t weight_elems(const Dims& D, Staged m) {
  switch (m) {
    case Staged::kDil: return (int64_t)D.n_layers * D.n_kern * D.n_res * D.n_gate();
    case Staged::kOut: return (int64_t)D.n_layers * D.n_dil * D.n_out();
    case Staged::kPost1: return (int64_t)D.n_skp * D.n_post;
    case Staged::kPost2: return (int64_t)D.n_post * D.n_quant;
  }
  return 0;
}

// Shared memory bytes of the four staged matrices.
template <class WT>
int64_t staged_bytes(const Dims& D) {
  int64_t b = 0;
  for (Staged m : {Staged::kDil, Staged::kOut, Staged::kPost1, Staged::kPost2})
    b += round16(weight_elems(D, m) * (int64_t)sizeof(WT));
  return b;
}

template <class WT>
__device__ const WT* stage(const WT* src, int64_t n, unsigned char*& dst) {
  WT* out = reinterpret_cast<WT*>(dst);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = src[i];
  dst += round16(n * (int64_t)sizeof(WT));
  return out;
}

// The class values the generation kernel will read: x_prev (B) and forced (n_forced entries, or null).
// Sets gen::BadClasses bits in *status (zeroed by the host); one thread per entry.
__global__ void check_classes_kernel(const int64_t* x_prev, int64_t B, const int64_t* forced, int64_t n_forced,
                                     int64_t n_quant, int* status) {
  WN_GRID_STRIDE_LOOP(i, B + n_forced) {
    if (i < B) {
      const int64_t x = x_prev[i];
      if (x < 0 || x >= n_quant) atomicOr(status, gen::kBadXPrev);
    } else if (forced[i - B] >= n_quant) {
      atomicOr(status, gen::kBadForced);
    }
  }
}

template <class WT>
__global__ void __launch_bounds__(kThreads) generate_kernel(Params<WT> P, Chunk c, int stage_weights,
                                                            const int* status) {
  if (*status != gen::kClassesOk) return;  // the host raises; nothing is written
  extern __shared__ float4 smem_f4[];
  float* sm = reinterpret_cast<float*>(smem_f4);
  const Dims D = P.dims;
  gen::Scratch s;
  s.acc = sm;
  s.y = s.acc + round4(D.n_out());
  s.h = s.y + round4(D.n_out());
  s.gate = s.h + round4(D.n_gate());
  s.z = s.gate + round4(D.n_dil);
  s.post = s.z + round4(D.n_skp);
  s.logits = s.post + round4(D.n_post);
  CudaExec ex;
  ex.rank = threadIdx.x;
  ex.size = blockDim.x;
  ex.partial = s.logits + round4(D.n_quant);
  ex.bcast = reinterpret_cast<int*>(ex.partial + round4(blockDim.x > 32 ? blockDim.x : 32));
  if (stage_weights) {
    unsigned char* dst = reinterpret_cast<unsigned char*>(sm + scratch_floats(D, blockDim.x));
    P.w_dil = stage(P.w_dil, weight_elems(D, Staged::kDil), dst);
    P.w_out = stage(P.w_out, weight_elems(D, Staged::kOut), dst);
    P.w_post1 = stage(P.w_post1, weight_elems(D, Staged::kPost1), dst);
    P.w_post2 = stage(P.w_post2, weight_elems(D, Staged::kPost2), dst);
    __syncthreads();
  }

  const int64_t b = blockIdx.x;
  float* queue = c.queues + b * P.q_rows * D.n_res;
  int x = (int)c.x_prev[b];
  for (int64_t i = 0; i < c.S; ++i) {
    const int64_t bi = b * c.S + i;
    x = gen::step(ex, P, c.cond + bi * D.cond_stride(), queue, s, x, c.t0 + i, c.u[bi],
                  c.forced ? c.forced[bi] : (int64_t)-1, c.logits ? c.logits + bi * D.n_quant : nullptr);
    if (threadIdx.x == 0) c.samples[bi] = x;
  }
  if (threadIdx.x == 0) c.x_prev[b] = x;
}

template <class WT>
void launch_generate(const gen::Problem& pr, const Params<WT>& P, const Chunk& c, const int* status,
                     const c10::Device& dev, cudaStream_t stream) {
  int max_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev.index()));
  const int64_t scratch = scratch_floats(pr.dims, kThreads) * (int64_t)sizeof(float);
  const int64_t weights = staged_bytes<WT>(pr.dims);
  const bool stage_weights = scratch + weights <= (int64_t)max_optin;
  const int64_t bytes = scratch + (stage_weights ? weights : 0);
  TORCH_CHECK(bytes <= max_optin, kOp, ": the model's scratch vectors need ", bytes,
              " bytes of shared memory per block, the device allows ", max_optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(generate_kernel<WT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  generate_kernel<WT><<<(unsigned)pr.B, kThreads, (size_t)bytes, stream>>>(P, c, stage_weights ? 1 : 0, status);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The class values of x_prev and forced, checked without stalling the GPU: check_classes_kernel writes
// gen::BadClasses bits to `status` on the stream, the bits are copied to pinned host memory behind an
// event, the generation kernel is queued after them (it returns at once when a bit is set), and only then
// does the host wait, for the event: the GPU never idles between the check and the generation, and the
// host reads one int instead of three .item() syncs before the launch. wait_and_raise() raises with the
// CPU engine's messages (gen::fail_on_bad_classes).
class ClassCheck {
 public:
  ClassCheck(const gen::Problem& pr, const std::optional<at::Tensor>& forced, const at::Tensor& x_prev,
             cudaStream_t stream)
      : n_quant_(pr.dims.n_quant) {
    status_ = at::zeros({1}, x_prev.options().dtype(at::kInt));  // on the current stream, i.e. `stream`
    status_host_ = at::empty({1}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    const int64_t n_forced = forced.has_value() ? forced->numel() : 0;
    check_classes_kernel<<<launch::num_blocks(pr.B + n_forced), kThreads, 0, stream>>>(
        x_prev.const_data_ptr<int64_t>(), pr.B, n_forced ? forced->const_data_ptr<int64_t>() : nullptr, n_forced,
        n_quant_, status_.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    C10_CUDA_CHECK(cudaMemcpyAsync(status_host_.data_ptr<int>(), status_.const_data_ptr<int>(), sizeof(int),
                                   cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&copied_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(copied_, stream));
  }
  ClassCheck(const ClassCheck&) = delete;
  ClassCheck& operator=(const ClassCheck&) = delete;
  ~ClassCheck() {
    if (copied_ == nullptr) return;
    if (!waited_) cudaEventSynchronize(copied_);  // an exception on the way: the copy must land before
    cudaEventDestroy(copied_);                    // the pinned block returns to torch's cache
  }

  const int* status() const { return status_.const_data_ptr<int>(); }

  void wait_and_raise() {
    C10_CUDA_CHECK(cudaEventSynchronize(copied_));
    waited_ = true;
    gen::fail_on_bad_classes(*status_host_.const_data_ptr<int>(), n_quant_);
  }

 private:
  int64_t n_quant_;
  at::Tensor status_;       // (1,) int32 on the GPU
  at::Tensor status_host_;  // (1,) int32, pinned
  cudaEvent_t copied_ = nullptr;
  bool waited_ = false;
};

std::tuple<at::Tensor, at::Tensor> wavenet_generate_cuda(
    const at::Tensor& embed, const at::Tensor& w_dil, const at::Tensor& w_out, const at::Tensor& b_out,
    const at::Tensor& w_post1, const at::Tensor& b_post1, const at::Tensor& w_post2, const at::Tensor& b_post2,
    at::IntArrayRef dilations, const at::Tensor& cond, const at::Tensor& u, const std::optional<at::Tensor>& forced,
    at::Tensor& queues, at::Tensor& x_prev, int64_t t0, bool want_logits, c10::string_view path) {
  (void)path;  // CPU paths only
  launch::check_cuda(cond, kOp, "cond");
  const c10::cuda::CUDAGuard device_guard(cond.device());
  const gen::Problem pr = gen::check_problem(embed, w_dil, w_out, b_out, w_post1, b_post1, w_post2, b_post2,
                                             dilations, cond, u, forced, queues, x_prev, t0);
  TORCH_CHECK(pr.B <= 2147483647LL, kOp, ": batch too large");
  at::Tensor samples = at::empty({pr.B, pr.S}, x_prev.options());
  at::Tensor logits = at::empty({want_logits ? pr.B : 0, pr.S, pr.dims.n_quant}, cond.options());
  if (pr.B == 0) return {samples, logits};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ClassCheck check(pr, forced, x_prev, stream);
  if (pr.S > 0) {
    const Chunk c = gen::make_chunk(cond, u, forced, queues, x_prev, samples, logits, want_logits, pr.S, t0);
    switch (w_dil.scalar_type()) {
      case at::kFloat:
        launch_generate(pr,
                        gen::make_params<float>(pr, embed, w_dil, w_out, b_out, w_post1, b_post1, w_post2, b_post2),
                        c, check.status(), cond.device(), stream);
        break;
      case at::kHalf:
        launch_generate(pr,
                        gen::make_params<__half>(pr, embed, w_dil, w_out, b_out, w_post1, b_post1, w_post2, b_post2),
                        c, check.status(), cond.device(), stream);
        break;
      case at::kBFloat16:
        launch_generate(pr,
                        gen::make_params<__nv_bfloat16>(pr, embed, w_dil, w_out, b_out, w_post1, b_post1, w_post2,
                                                        b_post2),
                        c, check.status(), cond.device(), stream);
        break;
      default:
        TORCH_CHECK(false, kOp, ": unsupported weight dtype ", w_dil.scalar_type());
    }
  }
  check.wait_and_raise();
  return {samples, logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(wavenet_ae, CUDA, m) {
  m.impl("wavenet_generate", &wavenet_generate_cuda);
}

}  // namespace wavenet_ae
