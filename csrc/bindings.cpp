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
  // Fused gated dilated causal residual layer (csrc/residual.h has the math; the reference is
  // wavenet_ae/ops.py:residual_layer_ref). x (B, n_res, L), lc (B, n_lc, >= n), g (B, n_global);
  // weights as the layer's modules hold them: w_dil (2 n_dil, n_res, K), w_lc (2 n_dil, n_lc, 1),
  // w_gc (2 n_dil, n_global), w_res (n_res, n_dil, 1) or None (last layer), w_skip (n_skp, n_dil, 1).
  // n = L - (K - 1) dilation. Returns x_out (B, n_res, n) (empty without w_res), skip (B, n_skp, n_out)
  // and `saved` (B, 2 n_dil, n or n_out), the state the backward needs.
  m.def("residual_layer_fwd(Tensor x, Tensor lc, Tensor g, Tensor w_dil, Tensor? b_dil, Tensor w_lc, "
        "Tensor w_gc, Tensor? w_res, Tensor? b_res, Tensor w_skip, Tensor? b_skip, int dilation, int n_out) "
        "-> (Tensor, Tensor, Tensor)");
  // Gradients of residual_layer_fwd: (x, lc, g, w_dil, b_dil, w_lc, w_gc, w_res, b_res, w_skip, b_skip);
  // absent biases/weights and input gradients not asked for (need_*) come back empty.
  m.def("residual_layer_bwd(Tensor? grad_x_out, Tensor grad_skip, Tensor x, Tensor lc, Tensor g, "
        "Tensor saved, Tensor w_dil, Tensor? b_dil, Tensor w_lc, Tensor w_gc, Tensor? w_res, Tensor? b_res, "
        "Tensor w_skip, Tensor? b_skip, int dilation, int n_out, bool need_x, bool need_lc, bool need_g) "
        "-> Tensor[]");
  // The decoder's output layer and cross-entropy, fused (csrc/cpu/output_loss.cpp; the reference is
  // wavenet_ae/ops.py:linear_cross_entropy_ref): h (B, n_in, N), w (n_quant, n_in), b (n_quant) or
  // None, target (B, N) int64. Returns the summed loss sum_{b,t} logsumexp(W h + b) - (W h + b)[target]
  // (0-dim) and, if need_grad, its gradients w.r.t. h, w and b (else empty).
  m.def("linear_cross_entropy(Tensor h, Tensor w, Tensor? b, Tensor target, bool need_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // How the CPU residual-layer kernel runs in this build ('elementwise=avx2|generic threads=N ...');
  // `like`: any CPU tensor.
  m.def("residual_layer_cpu_info(Tensor like) -> str");
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
