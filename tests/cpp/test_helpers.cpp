// Host tests of the __host__ __device__ helpers in csrc/include/bitpress (shared with the CUDA
// kernels): fp16/bf16 conversions against independent references, exhaustively over 16-bit inputs
// and over every float32 bit pattern for the narrowing conversions; INT4 nibble unpacking.
#include <bitpress/bitpress.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>

#include "check.h"

namespace {

float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t half_ref(float f) {  // GCC's _Float16 conversion: IEEE round to nearest even
  _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

// Round-to-nearest-even to bfloat16 by comparing distances in double (exact for these values).
uint16_t bf16_ref(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t lo = u & 0xffff0000u;
  const uint32_t hi = lo + 0x10000u;  // next bf16 away from zero (may be inf)
  const double x = std::fabs(double(f));
  const double dlo = std::fabs(double(as_float(lo)));
  // Past the largest finite bf16, the next step is 2^128 (not representable): rounding treats it
  // as the value one ulp above.
  const double dhi =
      (hi & 0x7fffffffu) == 0x7f800000u ? std::ldexp(1.0, 128) : std::fabs(double(as_float(hi)));
  const double elo = x - dlo, ehi = dhi - x;
  if (elo < ehi) return uint16_t(lo >> 16);
  if (ehi < elo) return uint16_t(hi >> 16);
  return ((lo >> 16) & 1u) ? uint16_t(hi >> 16) : uint16_t(lo >> 16);
}

bool is_nan_bits32(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }

}  // namespace

int main() {
  using namespace bitpress;

  // 16-bit -> float: every input.
  for (uint32_t h = 0; h < 65536; ++h) {
    _Float16 hv;
    const uint16_t h16 = uint16_t(h);
    std::memcpy(&hv, &h16, 2);
    const float want = float(hv), got = half_bits_to_float(h16);
    CHECK(std::memcmp(&want, &got, 4) == 0 || (std::isnan(want) && std::isnan(got)),
          "half_bits_to_float(0x%04x) = %a, want %a", h, got, want);
    const float b = bf16_bits_to_float(h16);
    uint32_t bb;
    std::memcpy(&bb, &b, 4);
    CHECK(bb == (h << 16), "bf16_bits_to_float(0x%04x)", h);
  }

  // float -> 16-bit. Rounding depends on the sign, the exponent, the lowest kept mantissa bit and
  // the dropped bits: sweep every sign and exponent, every pattern of the dropped bits, and a set
  // of kept-bit patterns (both parities, carries into the exponent). Plus random patterns.
  auto check_one = [](uint32_t u, bool half, bool bf16) {
    const float f = as_float(u);
    if (is_nan_bits32(u)) {
      if (half) CHECK((float_to_half_bits(f) & 0x7fff) > 0x7c00, "half(NaN 0x%08x)", u);
      if (bf16) CHECK((float_to_bf16_bits(f) & 0x7fff) > 0x7f80, "bf16(NaN 0x%08x)", u);
      return;
    }
    if (half) {
      const uint16_t h = float_to_half_bits(f), hr = half_ref(f);
      CHECK(h == hr, "float_to_half_bits(0x%08x = %a) = 0x%04x, want 0x%04x", u, f, h, hr);
    }
    if (bf16) {
      const uint16_t b = float_to_bf16_bits(f), br = bf16_ref(f);
      CHECK(b == br, "float_to_bf16_bits(0x%08x = %a) = 0x%04x, want 0x%04x", u, f, b, br);
    }
  };
  const uint32_t half_kept[] = {0x000, 0x001, 0x002, 0x155, 0x2aa, 0x3fe, 0x3ff};  // bits 13..22
  const uint32_t bf16_kept[] = {0x00, 0x01, 0x55, 0x7e, 0x7f};                     // bits 16..22
  for (uint32_t sign = 0; sign < 2; ++sign) {
    for (uint32_t e = 0; e < 256; ++e) {
      const uint32_t top = (sign << 31) | (e << 23);
      for (uint32_t kept : half_kept)
        for (uint32_t low = 0; low < (1u << 13); ++low)
          check_one(top | (kept << 13) | low, true, false);
      for (uint32_t kept : bf16_kept)
        for (uint32_t low = 0; low < (1u << 16); ++low)
          check_one(top | (kept << 16) | low, false, true);
    }
  }
  std::mt19937 rng(42);
  for (int i = 0; i < (1 << 22); ++i) check_one(uint32_t(rng()), true, true);

  // Nibbles: lowest first.
  const uint32_t word = 0x89abcdefu;
  for (int j = 0; j < 8; ++j) CHECK(unpack_nibble(word, j) == 15 - j, "nibble %d", j);
  CHECK(int4_group_of(130, nullptr, 128) == 1, "group of 130");
  const int32_t g_idx[3] = {2, 0, 1};
  CHECK(int4_group_of(0, g_idx, 128) == 2, "g_idx lookup");

  // The ISA override: scalar always works; the best path is what active_cpu_isa() reports.
  CHECK(set_cpu_isa(CpuIsa::kScalar) == Status::kSuccess, "force scalar");
  CHECK(active_cpu_isa() == CpuIsa::kScalar, "scalar active");
  reset_cpu_isa();
  CHECK(active_cpu_isa() == best_cpu_isa(), "reset");
  CHECK(set_cpu_isa(CpuIsa(7)) == Status::kInvalidArgument, "bad isa");

  return check_result("test_helpers");
}
