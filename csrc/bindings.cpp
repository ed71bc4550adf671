// Op schemas (declared once, here) and the Python module wavenet_ae._C.
//
// Kernels register themselves per device: csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(wavenet_ae, CPU, m),
// csrc/cuda/*.cu with TORCH_LIBRARY_IMPL(wavenet_ae, CUDA, m) (built only when WAVENET_AE_WITH_CUDA).
// Importing wavenet_ae._C runs these registrations; the ops are then torch.ops.wavenet_ae.*.
// One file per op and device, named after the op: csrc/cpu/<op>.cpp, csrc/cuda/<op>[_fwd|_bwd].cu,
// shared math and checks in csrc/<op>.h (residual_layer_fwd/_bwd live in residual_layer*).
#include <string>

#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include "cpu/blas.h"
#include "cpu/cpu_paths.h"
#include "cpu/simd.h"

// The extension's interface version: bump it whenever an op is added or removed or a schema below
// changes, together with wavenet_ae/ops/_ext.py:ABI. A build whose number differs from the Python
// side's does not count as loaded (the package runs the references and names the rebuild command).
constexpr int kAbi = 1;

TORCH_LIBRARY(wavenet_ae, m) {
  // Float audio in [-1, 1] (clamped; NaN -> 0) -> int64 classes in [0, n_quant - 1], same shape.
  m.def("mu_law_encode(Tensor x, int n_quant) -> Tensor");
  // Integer classes (clamped to [0, n_quant - 1]) -> float32 audio in [-1, 1], same shape.
  m.def("mu_law_decode(Tensor q, int n_quant) -> Tensor");
  // Incremental WaveNet generation over S steps for B items (csrc/wavenet_step.h has the math and the
  // packed layout; wavenet_ae/ops/wavenet_generate.py:wavenet_generate_ref is the reference).
  // cond (B, S, L * 2 n_dil) f32, u (B, S) f32 uniforms, forced (B, S) int64 (>= 0: emit that class, < 0:
  // sample) or None,
  // queues (B, sum_l (K-1) d_l, n_res) f32 and x_prev (B,) int64 are updated in place, t0 = absolute
  // step of the first step. Returns samples (B, S) int64 and logits (B, S, n_quant) f32 if want_logits
  // (else (0, S, n_quant)). path: CPU code path 'auto' | 'generic' | 'avx2' (ignored on CUDA).
  m.def("wavenet_generate(Tensor embed, Tensor w_dil, Tensor w_out, Tensor b_out, Tensor w_post1, "
        "Tensor b_post1, Tensor w_post2, Tensor b_post2, int[] dilations, Tensor cond, Tensor u, "
        "Tensor? forced, Tensor(a!) queues, Tensor(b!) x_prev, int t0, bool want_logits, str path) "
        "-> (Tensor, Tensor)");
  // The CPU code path wavenet_generate runs for `request` ('auto' resolves by cpuid); `like`: any CPU tensor.
  m.def("wavenet_generate_cpu_path(Tensor like, str request) -> str");
  // Fused gated dilated causal residual layer (csrc/residual_layer.h has the math; the reference is
  // wavenet_ae/ops/residual_layer.py:residual_layer_ref). x (B, n_res, L), lc (B, n_lc, >= n),
  // g (B, n_global);
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
  // The decoder's output layer and cross-entropy, fused (csrc/cpu/linear_cross_entropy.cpp; the reference
  // is wavenet_ae/ops/linear_cross_entropy.py:linear_cross_entropy_ref): h (B, n_in, N), w (n_quant, n_in),
  // b (n_quant) or None, target (B, N) int64. Returns the summed loss sum_{b,t} logsumexp(W h + b) - (W h + b)[target]
  // (0-dim) and, if need_grad, its gradients w.r.t. h, w and b (else empty).
  m.def("linear_cross_entropy(Tensor h, Tensor w, Tensor? b, Tensor target, bool need_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // How the CPU residual-layer kernel runs in this build ('elementwise=avx2|generic threads=N ...');
  // `like`: any CPU tensor.
  m.def("residual_layer_cpu_info(Tensor like) -> str");
}

namespace {

namespace py = pybind11;

// Instruction sets the compiler could use in all of the extension's code (compile time; the build sets
// no -march, so on x86-64 this is the SSE2 baseline however capable the machine).
py::list simd_compiled() {
  py::list out;
#if defined(__SSE2__)
  out.append("sse2");
#endif
#if defined(__SSE4_2__)
  out.append("sse4_2");
#endif
#if defined(__AVX__)
  out.append("avx");
#endif
#if defined(__AVX2__)
  out.append("avx2");
#endif
#if defined(__FMA__)
  out.append("fma");
#endif
#if defined(__AVX512F__)
  out.append("avx512f");
#endif
#if defined(__ARM_NEON) || defined(__ARM_NEON__)
  out.append("neon");
#endif
  return out;
}

// Instruction sets of the functions compiled with target attributes (csrc/cpu/simd.h), run only where
// cpuid reports them.
py::list simd_runtime() {
  py::list out;
#if WN_HAVE_X86
  out.append("avx2");
  out.append("fma");
#endif
  return out;
}

// CUDA architectures of the kernels in this build (from setup.py: the nvcc -gencode targets, sm_XY
// machine code and compute_XY PTX), empty without CUDA kernels.
#define WN_STR(...) #__VA_ARGS__
#define WN_XSTR(...) WN_STR(__VA_ARGS__)
py::list cuda_archs() {
  py::list out;
#if defined(WAVENET_AE_WITH_CUDA) && defined(WAVENET_AE_CUDA_ARCHS)
  const std::string list = WN_XSTR(WAVENET_AE_CUDA_ARCHS);
  size_t begin = 0;
  while (begin < list.size()) {
    size_t end = list.find(',', begin);
    if (end == std::string::npos) end = list.size();
    if (end > begin) out.append(list.substr(begin, end - begin));
    begin = end + 1;
  }
#endif
  return out;
}

bool has_cuda() {
#if defined(WAVENET_AE_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

// What this build holds and which code path each CPU kernel takes on this machine; every entry comes
// from the code that decides it (cpuid, environment, compile flags), nothing is assumed.
py::dict build_info() {
  py::dict d;
  d["abi"] = kAbi;
  d["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
               std::to_string(TORCH_VERSION_PATCH);
  d["simd_compiled"] = simd_compiled();
  d["simd_runtime"] = simd_runtime();
  d["cpu_has_avx2"] = wavenet_ae::cpu::cpu_has_avx2();
  py::dict paths;
  paths["wavenet_generate"] = wavenet_ae::cpu::wavenet_generate_path("auto");
  paths["residual_layer"] = wavenet_ae::cpu::residual_layer_elementwise_path();
  paths["linear_cross_entropy"] = wavenet_ae::cpu::linear_cross_entropy_elementwise_path();
  paths["gemm"] = wavenet_ae::cpu::gemm_path();
  d["cpu_paths"] = paths;
#if defined(_OPENMP)
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  // at::parallel_for inlines `#pragma omp parallel` under ATen's OpenMP backend: without -fopenmp the
  // residual and output-loss kernels run on one thread (generation uses std::thread either way).
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
  d["threads"] = 1;
#else
  d["threads"] = at::get_num_threads();
#endif
  d["cuda"] = has_cuda();
  d["cuda_archs"] = cuda_archs();
  return d;
}

// The SIMD path of the CPU kernels on this machine: 'avx2' (chosen by cpuid at run time), 'neon' (an
// ARM build) or 'generic'. Kept for older callers; build_info() has the whole picture.
const char* cpu_capability() {
  if (wavenet_ae::cpu::cpu_has_avx2()) return "avx2";
#if defined(__ARM_NEON) || defined(__ARM_NEON__)
  return "neon";
#else
  return "generic";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wavenet_ae C++/CUDA kernels; ops are registered as torch.ops.wavenet_ae.*";
  m.def("build_info", &build_info,
        "Dict: abi (interface version), torch (compiled against), simd_compiled / simd_runtime (instruction "
        "sets of all code / of the cpuid-selected functions), cpu_has_avx2, cpu_paths (the path each CPU kernel "
        "takes here: wavenet_generate, residual_layer, linear_cross_entropy: 'avx2' | 'generic'; gemm: 'blas' | "
        "'aten'), openmp, threads, cuda (CUDA kernels built), cuda_archs.");
  m.def("cpu_capability", &cpu_capability,
        "SIMD path the CPU kernels take on this machine: 'avx2', 'neon' or 'generic' (see build_info()).");
  m.def("has_cuda", &has_cuda, "True when this build contains the CUDA kernels.");
}
