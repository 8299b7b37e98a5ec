// Portability macros shared by the CPU and CUDA kernels. Torch-free.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BITPRESS_HOST_DEVICE __host__ __device__
#define BITPRESS_DEVICE __device__
#else
#define BITPRESS_HOST_DEVICE
#define BITPRESS_DEVICE
#endif

#define BITPRESS_INLINE BITPRESS_HOST_DEVICE inline

// True while compiling device code for a given SM (e.g. BITPRESS_ARCH_AT_LEAST(900)).
#if defined(__CUDA_ARCH__)
#define BITPRESS_ARCH_AT_LEAST(sm) (__CUDA_ARCH__ >= (sm))
#else
#define BITPRESS_ARCH_AT_LEAST(sm) 0
#endif
