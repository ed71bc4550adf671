// Op schemas (declared once, here) and the Python module wavenet_ae._C.
//
// Kernels register themselves per device: csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(wavenet_ae, CPU, m),
// csrc/cuda/*.cu with TORCH_LIBRARY_IMPL(wavenet_ae, CUDA, m) (built only when WAVENET_AE_WITH_CUDA).
// Importing wavenet_ae._C runs these registrations; the ops are then torch.ops.wavenet_ae.*.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(wavenet_ae, m) {
  // Float audio in [-1, 1] (clamped; NaN -> 0) -> int64 classes in [0, n_quant - 1], same shape.
  m.def("mu_law_encode(Tensor x, int n_quant) -> Tensor");
  // Integer classes (clamped to [0, n_quant - 1]) -> float32 audio in [-1, 1], same shape.
  m.def("mu_law_decode(Tensor q, int n_quant) -> Tensor");
  // Incremental WaveNet generation over S steps for B items (csrc/wavenet_step.h has the math and the
  // packed layout; wavenet_ae/ops.py:wavenet_generate_ref is the reference). cond (B, S, L * 2 n_dil)
  // f32, u (B, S) f32 uniforms, forced (B, S) int64 (>= 0: emit that class, < 0: sample) or None,
  // queues (B, sum_l (K-1) d_l, n_res) f32 and x_prev (B,) int64 are updated in place, t0 = absolute
  // step of the first step. Returns samples (B, S) int64 and logits (B, S, n_quant) f32 if want_logits
  // (else (0, S, n_quant)). path: CPU code path 'auto' | 'generic' | 'avx2' (ignored on CUDA).
  m.def("wavenet_generate(Tensor embed, Tensor w_dil, Tensor w_out, Tensor b_out, Tensor w_post1, "
        "Tensor b_post1, Tensor w_post2, Tensor b_post2, int[] dilations, Tensor cond, Tensor u, "
        "Tensor? forced, Tensor(a!) queues, Tensor(b!) x_prev, int t0, bool want_logits, str path) "
        "-> (Tensor, Tensor)");
  // The CPU code path wavenet_generate runs for `request` ('auto' resolves by cpuid); `like`: any CPU tensor.
  m.def("wavenet_generate_cpu_path(Tensor like, str request) -> str");
}

namespace {

// SIMD path the CPU kernels were compiled for (compile-time: the build uses no -march by default).
const char* cpu_capability() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__ARM_NEON) || defined(__ARM_NEON__)
  return "neon";
#else
  return "generic";
#endif
}

// Whether this build contains CUDA kernels.
bool has_cuda() {
#if defined(WAVENET_AE_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wavenet_ae C++/CUDA kernels; ops are registered as torch.ops.wavenet_ae.*";
  m.def("cpu_capability", &cpu_capability,
        "SIMD path the CPU kernels were compiled for: 'avx512', 'avx2', 'neon' or 'generic'.");
  m.def("has_cuda", &has_cuda, "True when this build contains the CUDA kernels.");
}
