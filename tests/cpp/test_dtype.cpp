// Host tests of bitpress/common/dtype.h: every DType's size and name (fp8 included), the unknown
// value (size 0, "unknown", not known / valid), and the kernels' fp32/fp16/bf16 subset.
#include <bitpress/bitpress.h>

#include <cstring>
#include <initializer_list>

#include "check.h"

using namespace bitpress;

namespace {

struct Expected {
  DType t;
  int size;
  const char* name;
  bool kernel_type;  // dtype_valid: loaded and stored by the int4 / spec_verify kernels
};

const Expected kAll[] = {
    {DType::kFloat32, 4, "float32", true},         {DType::kFloat16, 2, "float16", true},
    {DType::kBFloat16, 2, "bfloat16", true},       {DType::kFloat8E4M3, 1, "float8_e4m3fn", false},
    {DType::kFloat8E5M2, 1, "float8_e5m2", false},
};

// Evaluated at compile time: the helpers are constexpr.
static_assert(dtype_size(DType::kFloat8E4M3) == 1 && dtype_size(DType::kFloat32) == 4);
static_assert(dtype_size(DType(99)) == 0);

}  // namespace

int main() {
  for (const Expected& e : kAll) {
    CHECK(dtype_size(e.t) == e.size, "size of %s: %d", e.name, dtype_size(e.t));
    CHECK(std::strcmp(dtype_name(e.t), e.name) == 0, "name %s != %s", dtype_name(e.t), e.name);
    CHECK(dtype_known(e.t), "%s known", e.name);
    CHECK(dtype_valid(e.t) == e.kernel_type, "%s kernel type", e.name);
  }
  // The ABI values of the enumerators.
  CHECK(int(DType::kFloat32) == 0 && int(DType::kFloat16) == 1 && int(DType::kBFloat16) == 2 &&
            int(DType::kFloat8E4M3) == 3 && int(DType::kFloat8E5M2) == 4,
        "enumerator values");
  // Values that are no enumerator (a caller casting an int): size 0, never a default size.
  for (int v : {-1, 5, 6, 42, 1 << 20}) {
    const DType t = DType(v);
    CHECK(dtype_size(t) == 0, "size of DType(%d): %d", v, dtype_size(t));
    CHECK(std::strcmp(dtype_name(t), "unknown") == 0, "name of DType(%d): %s", v, dtype_name(t));
    CHECK(!dtype_known(t), "DType(%d) unknown", v);
    CHECK(!dtype_valid(t), "DType(%d) not a kernel type", v);
  }
  // A kernel given fp8 (a known DType it does not handle) rejects it.
  int32_t qweight[2] = {0x76543210, 0x01234567};
  float scales[2] = {1.f, 1.f};
  uint8_t out[16] = {};
  Int4DequantizeParams p;
  p.qweight = qweight;
  p.qweight_row_stride = 2;
  p.scales = scales;
  p.scales_dtype = DType::kFloat32;
  p.scales_row_stride = 2;
  p.out = out;
  p.out_dtype = DType::kFloat8E4M3;
  p.out_row_stride = 2;
  p.K = 8;
  p.N = 2;
  p.num_groups = 1;
  p.group_size = 8;
  CHECK(int4_dequantize_cpu(p) == Status::kInvalidArgument, "int4_dequantize_cpu(out fp8)");
  p.out_dtype = DType::kFloat32;
  p.scales_dtype = DType::kFloat8E5M2;
  CHECK(int4_dequantize_cpu(p) == Status::kInvalidArgument, "int4_dequantize_cpu(scales fp8)");
  return check_result("test_dtype");
}
