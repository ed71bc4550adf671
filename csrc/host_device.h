// WN_HD marks a function that both compilers build: the scalar math shared by the CPU kernels (g++)
// and the CUDA kernels (nvcc), e.g. mu_law.h and wavenet_step.h. Under nvcc it is a host and device
// function, force-inlined; under g++ a plain inline function. The one such macro of csrc/.
#pragma once

#if defined(__CUDACC__)
#define WN_HD __host__ __device__ __forceinline__
#else
#define WN_HD inline
#endif
