// The run-time code paths of the CPU kernels on this machine. Each function is defined next to the
// dispatch it describes, from the same test (cpuid, environment), so what it reports is what runs;
// csrc/bindings.cpp:build_info collects them (the GEMM path: cpu::gemm_path() in blas.h).
#pragma once

#include <string>

namespace wavenet_ae::cpu {

// wavenet_generate's path for `request` ('auto' | 'generic' | 'avx2'): "avx2" or "generic" (the same for
// float32, float16 and bfloat16 weights); raises for an unknown request or 'avx2' on a CPU without
// AVX2+FMA+F16C. (cpu/wavenet_generate.cpp)
std::string wavenet_generate_path(const std::string& request);

// The elementwise passes (gate, its gradient) of residual_layer_fwd/_bwd on float32: "avx2" or "generic"
// (float64 always runs the portable loops). (cpu/residual_layer.cpp)
const char* residual_layer_elementwise_path();

// The exponentials of linear_cross_entropy on float32: "avx2" or "generic" (float64: portable loops).
// (cpu/linear_cross_entropy.cpp)
const char* linear_cross_entropy_elementwise_path();

}  // namespace wavenet_ae::cpu
