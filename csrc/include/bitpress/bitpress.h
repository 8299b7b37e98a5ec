// Umbrella header of the torch-free bitpress kernel API (link bitpress::kernels).
#pragma once

#include "bitpress/cpu.h"
#include "bitpress/cpu/gemm_microkernel.h"
#include "bitpress/dtype.h"
#include "bitpress/int4.h"
#include "bitpress/int4_dequantize.h"
#include "bitpress/int4_gemm.h"
#include "bitpress/int4_mma_dequant.h"
#include "bitpress/int4_mma_layout.h"
#include "bitpress/philox.h"
#include "bitpress/spec_verify.h"
#include "bitpress/status.h"
#include "bitpress/version.h"
