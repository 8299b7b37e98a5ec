// AMX-BF16 variant of the CPU GEMM microkernel (bitpress/cpu/gemm_microkernel.h), and its host
// emulation: one loop nest (amx_gemm<Ops>) instantiated with the real tile instructions and with a
// scalar model of the tile registers, so that the emulation tests the real variant's tile shapes,
// configuration, index maps and data layout on CPUs without AMX.
//
// Tiles (palette 1: 8 tiles of at most 16 rows x 64 bytes):
//   C tiles 0..3: C[i][j] = tile 2i + j, 16 rows x 16 float32, rows of row tile i, columns of
//                 column tile j of the 32 x 32 block
//   A tiles 4, 5: rows of row tile i x 32 bf16 (16 pairs of K)
//   B tiles 6, 7: 16 pair rows of K x 16 columns (64 B: 16 bf16 pairs), the VNNI layout as stored
// A 32 x 32 block takes 2 A + 2 B tile loads (4 KiB) per 4 tdpbf16ps (16 x 16 x 32 each): the
// largest block 8 tiles hold. Rows past M (a row tile of r < 16 rows) and a 16-column tail use a
// configuration with fewer rows / unused tiles, so that nothing outside A, B, C is read or written.
#include <string.h>

#include "bitpress/common/cpu.h"
#include "bitpress/cpu/gemm_microkernel.h"
#include "cpu/bf16_emulation.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define BITPRESS_TARGET_AMX __attribute__((target("amx-tile,amx-bf16")))
#else
#define BITPRESS_TARGET_AMX
#endif

namespace bitpress {
namespace cpu {
namespace {

// The 64-byte operand of ldtilecfg (Intel SDM, LDTILECFG: palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 0;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

constexpr int kC00 = 0, kC01 = 1, kC10 = 2, kC11 = 3, kA0 = 4, kA1 = 5, kB0 = 6, kB1 = 7;

// Rows of row tiles 0 and 1 (0: unused), column tiles used (1 or 2).
TileConfig make_config(int r0, int r1, int nc) {
  TileConfig c;
  c.palette = 1;
  auto set = [&](int t, int rows, int colsb) {
    c.rows[t] = uint8_t(rows);
    c.colsb[t] = uint16_t(rows ? colsb : 0);
  };
  set(kC00, r0, 64);
  set(kC01, nc > 1 ? r0 : 0, 64);
  set(kC10, r1, 64);
  set(kC11, nc > 1 ? r1 : 0, 64);
  set(kA0, r0, 64);
  set(kA1, r1, 64);
  set(kB0, 16, 64);
  set(kB1, nc > 1 ? 16 : 0, 64);
  return c;
}

// The shape this thread's tiles are configured for (-1: none): ldtilecfg only when it changes.
// The tile state is per thread, so is this.
struct ConfigState {
  int key = -1;
};
inline int config_key(int r0, int r1, int nc) { return (r0 * 17 + r1) * 3 + nc; }

// One block: C rows [0, 16 R) x columns [0, 16 NC) (+)= A B over K in steps of 32. All tile loads
// of a step come before its tdpbf16ps: loads interleaved with the products ran ~25% slower (tiles
// are not renamed, so a load waits for the products that read the tile it overwrites).
template <class Ops, int R, int NC>
BITPRESS_TARGET_AMX inline void amx_block(const GemmBf16Args& g, const uint16_t* a0, float* c0,
                                          const uint32_t* b0) {
  const int64_t lda_b = g.lda * 2, ldb_b = g.ldb * 4, ldc_b = g.ldc * 4;
  const uint16_t* a1 = a0 + 16 * g.lda;
  float* c1 = c0 + 16 * g.ldc;
  if (g.accumulate) {
    Ops::template load<kC00>(c0, ldc_b);
    if (NC > 1) Ops::template load<kC01>(c0 + 16, ldc_b);
    if (R > 1) Ops::template load<kC10>(c1, ldc_b);
    if (R > 1 && NC > 1) Ops::template load<kC11>(c1 + 16, ldc_b);
  } else {
    Ops::template zero<kC00>();
    if (NC > 1) Ops::template zero<kC01>();
    if (R > 1) Ops::template zero<kC10>();
    if (R > 1 && NC > 1) Ops::template zero<kC11>();
  }
  // B rows are pairs: K rows k0..k0+31 are pair rows k0/2..k0/2+15.
  const int64_t b_step = 16 * g.ldb;
  for (int64_t k0 = 0; k0 < g.K; k0 += 32, b0 += b_step) {
    Ops::template load<kA0>(a0 + k0, lda_b);
    if (R > 1) Ops::template load<kA1>(a1 + k0, lda_b);
    Ops::template load<kB0>(b0, ldb_b);
    if (NC > 1) Ops::template load<kB1>(b0 + 16, ldb_b);
    Ops::template dp<kC00, kA0, kB0>();
    if (NC > 1) Ops::template dp<kC01, kA0, kB1>();
    if (R > 1) Ops::template dp<kC10, kA1, kB0>();
    if (R > 1 && NC > 1) Ops::template dp<kC11, kA1, kB1>();
  }
  Ops::template store<kC00>(c0, ldc_b);
  if (NC > 1) Ops::template store<kC01>(c0 + 16, ldc_b);
  if (R > 1) Ops::template store<kC10>(c1, ldc_b);
  if (R > 1 && NC > 1) Ops::template store<kC11>(c1 + 16, ldc_b);
}

// The loop nest: C[M, N] (+)= A[M, K] B over 32 x 32 blocks (row tiles of r0, r1 rows).
template <class Ops>
BITPRESS_TARGET_AMX inline void amx_gemm(const GemmBf16Args& g, ConfigState& st) {
  for (int64_t m0 = 0; m0 < g.M; m0 += 32) {
    const int r0 = int(g.M - m0 < 16 ? g.M - m0 : 16);
    const int r1 = int(g.M - m0 <= 16 ? 0 : g.M - m0 - 16 < 16 ? g.M - m0 - 16 : 16);
    const uint16_t* a0 = g.a + m0 * g.lda;
    for (int64_t n0 = 0; n0 < g.N; n0 += 32) {
      const int nc = g.N - n0 >= 32 ? 2 : 1;
      const int key = config_key(r0, r1, nc);
      if (st.key != key) {
        const TileConfig cfg = make_config(r0, r1, nc);
        Ops::config(&cfg);
        st.key = key;
      }
      float* c0 = g.c + m0 * g.ldc + n0;
      const uint32_t* b0 = g.b + n0;
      if (r1 && nc > 1) {
        amx_block<Ops, 2, 2>(g, a0, c0, b0);
      } else if (r1) {
        amx_block<Ops, 2, 1>(g, a0, c0, b0);
      } else if (nc > 1) {
        amx_block<Ops, 1, 2>(g, a0, c0, b0);
      } else {
        amx_block<Ops, 1, 1>(g, a0, c0, b0);
      }
    }
  }
}

#if defined(__x86_64__)
// GCC's tile intrinsics are macros that paste the tile number into the register name (tmm0..7):
// each (op, tile) is spelled out with a literal.
struct RealOps {
  BITPRESS_TARGET_AMX static inline void config(const TileConfig* c) { _tile_loadconfig(c); }
  template <int T>
  static void zero();
  template <int T>
  static void load(const void* p, int64_t stride);
  template <int T>
  static void store(void* p, int64_t stride);
  template <int C, int A, int B>
  static void dp();
};
#define BITPRESS_AMX_TILE_OPS(T)                                                    \
  template <>                                                                       \
  BITPRESS_TARGET_AMX inline void RealOps::zero<T>() {                              \
    _tile_zero(T);                                                                  \
  }                                                                                 \
  template <>                                                                       \
  BITPRESS_TARGET_AMX inline void RealOps::load<T>(const void* p, int64_t stride) { \
    _tile_loadd(T, p, stride);                                                      \
  }                                                                                 \
  template <>                                                                       \
  BITPRESS_TARGET_AMX inline void RealOps::store<T>(void* p, int64_t stride) {      \
    _tile_stored(T, p, stride);                                                     \
  }
BITPRESS_AMX_TILE_OPS(0)
BITPRESS_AMX_TILE_OPS(1)
BITPRESS_AMX_TILE_OPS(2)
BITPRESS_AMX_TILE_OPS(3)
BITPRESS_AMX_TILE_OPS(4)
BITPRESS_AMX_TILE_OPS(5)
BITPRESS_AMX_TILE_OPS(6)
BITPRESS_AMX_TILE_OPS(7)
#undef BITPRESS_AMX_TILE_OPS
#define BITPRESS_AMX_DP(C, A, B)                           \
  template <>                                              \
  BITPRESS_TARGET_AMX inline void RealOps::dp<C, A, B>() { \
    _tile_dpbf16ps(C, A, B);                               \
  }
BITPRESS_AMX_DP(0, 4, 6)
BITPRESS_AMX_DP(1, 4, 7)
BITPRESS_AMX_DP(2, 5, 6)
BITPRESS_AMX_DP(3, 5, 7)
#undef BITPRESS_AMX_DP
thread_local ConfigState t_real;
#endif

// Scalar model of the tile registers of one thread.
struct EmuState {
  TileConfig cfg;
  alignas(64) uint8_t tile[8][16][64];
};
thread_local EmuState t_emu;
thread_local ConfigState t_emu_cfg;

struct EmuOps {
  static void config(const TileConfig* c) {
    // ldtilecfg zeroes every tile.
    t_emu.cfg = *c;
    memset(t_emu.tile, 0, sizeof t_emu.tile);
  }
  template <int T>
  static void zero() {
    memset(t_emu.tile[T], 0, sizeof t_emu.tile[T]);
  }
  template <int T>
  static void load(const void* p, int64_t stride) {
    // Rows past the configured ones, and bytes past colsb, are zero.
    memset(t_emu.tile[T], 0, sizeof t_emu.tile[T]);
    for (int r = 0; r < t_emu.cfg.rows[T]; ++r) {
      memcpy(t_emu.tile[T][r], static_cast<const char*>(p) + r * stride, t_emu.cfg.colsb[T]);
    }
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    for (int r = 0; r < t_emu.cfg.rows[T]; ++r) {
      memcpy(static_cast<char*>(p) + r * stride, t_emu.tile[T][r], t_emu.cfg.colsb[T]);
    }
  }
  // TDPBF16PS (Intel SDM): for each row m of C, pair k of A's row (k < colsb(A) / 4) and column n
  // (n < colsb(C) / 4): C[m][n] += A[m].bf16[2k] * B[k].bf16[2n], then
  // C[m][n] += A[m].bf16[2k+1] * B[k].bf16[2n+1]; DAZ on the inputs, FTZ and round to nearest even
  // on each float32 addition (a product of two bf16 is exact in float32, so each step rounds once).
  template <int C, int A, int B>
  static void dp() {
    const TileConfig& cf = t_emu.cfg;
    for (int m = 0; m < cf.rows[C]; ++m) {
      float acc[16];
      memcpy(acc, t_emu.tile[C][m], 64);
      uint16_t a[32];
      memcpy(a, t_emu.tile[A][m], 64);
      for (int k = 0; k < cf.colsb[A] / 4; ++k) {
        uint16_t b[32];
        memcpy(b, t_emu.tile[B][k], 64);
        for (int n = 0; n < cf.colsb[C] / 4; ++n) {
          acc[n] = ftz(acc[n] + bf16_daz(a[2 * k]) * bf16_daz(b[2 * n]));
          acc[n] = ftz(acc[n] + bf16_daz(a[2 * k + 1]) * bf16_daz(b[2 * n + 1]));
        }
      }
      memcpy(t_emu.tile[C][m], acc, 64);
    }
  }
};

}  // namespace

void gemm_bf16_amx(const GemmBf16Args& args) {
#if defined(__x86_64__)
  amx_gemm<RealOps>(args, t_real);
#else
  (void)args;
#endif
}

void gemm_bf16_amx_emulated(const GemmBf16Args& args) { amx_gemm<EmuOps>(args, t_emu_cfg); }

#if defined(__x86_64__)
BITPRESS_TARGET_AMX static void tile_release() { _tile_release(); }
#endif

void gemm_amx_thread_begin() {
#if defined(__x86_64__)
  t_real.key = -1;
#endif
  t_emu_cfg.key = -1;
}

void gemm_amx_release_thread() {
#if defined(__x86_64__)
  if (t_real.key >= 0 && amx_usable()) {
    tile_release();
    t_real.key = -1;
  }
#endif
}

}  // namespace cpu
}  // namespace bitpress
