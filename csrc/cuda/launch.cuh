// Launch helpers shared by the CUDA kernels (csrc/cuda/*.cu): the block size, the grid size of a
// grid-stride loop and the loop itself, the device check of an op's tensor arguments, device math.
// Each kernel takes its pointers, strides and sizes in one params struct, filled by one set_*_params
// function next to the kernel (as flash-attention's set_params_fprop).
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "host_device.h"

namespace wavenet_ae {
namespace launch {

constexpr int kThreads = 256;          // threads per block (a multiple of 32)
constexpr int64_t kMaxBlocks = 65535;  // grid size cap: the grid-stride loop covers the rest

// Blocks of kThreads for n work items, one item per thread up to kMaxBlocks blocks (at least one).
inline unsigned int num_blocks(int64_t n) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

// Argument `arg` of `op` must live on a CUDA device.
inline void check_cuda(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.is_cuda(), op, ": ", arg, " must be a CUDA tensor, got device ", t.device());
}

__device__ __forceinline__ float sigmoidf(float v) { return 1.f / (1.f + expf(-v)); }

}  // namespace launch
}  // namespace wavenet_ae

// for (int64_t i = this thread's index in the grid; i < n; i += threads in the grid) { ... }
#define WN_GRID_STRIDE_LOOP(i, n)                                                                   \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,                     \
               i##_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;                           \
       i < (n); i += i##_stride)
