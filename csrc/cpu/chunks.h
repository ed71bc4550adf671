// Work split of the CPU kernels: contiguous chunks of work items, one per torch thread. Each chunk
// owns its accumulators, reduced afterwards in chunk order, so results do not depend on thread
// scheduling (only on the thread count).
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>

namespace wavenet_ae::cpu {

struct Chunks {
  int64_t items, n;
  int64_t begin(int64_t c) const { return c * items / n; }
};

inline Chunks make_chunks(int64_t items) {
  return {items, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items))};
}

}  // namespace wavenet_ae::cpu
