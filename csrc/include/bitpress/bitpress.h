// Umbrella header of the torch-free bitpress kernel API (link bitpress::kernels). Compiles as plain
// C++ on the host; the device-only parts of bitpress/cuda/ need nvcc.
#pragma once

#include "bitpress/common/cpu.h"
#include "bitpress/common/dtype.h"
#include "bitpress/common/macros.h"
#include "bitpress/common/philox.h"
#include "bitpress/common/status.h"
#include "bitpress/common/version.h"
#include "bitpress/cpu/gemm_microkernel.h"
#include "bitpress/cuda/primitives.cuh"
#include "bitpress/int4/int4.h"
#include "bitpress/int4/int4_dequantize.h"
#include "bitpress/int4/int4_gemm.h"
#include "bitpress/int4/int4_mma_dequant.h"
#include "bitpress/int4/int4_mma_layout.h"
#include "bitpress/speculative/spec_verify.h"
