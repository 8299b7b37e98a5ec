// Target attributes of the CPU kernels' ISA paths (one place, so that every kernel compiles its
// AVX2 / AVX-512 variants for the same feature sets that cpu_features.cpp checks at run time).
#pragma once

#if defined(__x86_64__)
#define BITPRESS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define BITPRESS_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
// Only for kernels that check cpu_features().avx512_bf16 before use.
#define BITPRESS_TARGET_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#endif
