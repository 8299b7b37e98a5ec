"""int4_dequantize: GPTQ INT4 [K, N] -> fp16, on the shapes of Llama-3-8B projections.

Bytes: qweight K*N/2 + scales 2*N*K/128 read, output 2*K*N written. The floor divides them by
the measured read bandwidth (writes cost at least as much on this machine). Baselines in the same
run: the plain-torch reference (bitpress.reference) and a copy of a dense fp16 [K, N] matrix
(what the output write alone costs).
"""

from __future__ import annotations

import pytest
import torch
from bench_util import Row, record, seconds_of, timeit

from bitpress import ops, reference
from bitpress.int4.packing import pack_int4_along_k

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # Llama-3-8B: qkv/o, gate/up, down


def _data(K, N, device):
    q = torch.randint(0, 16, (K, N), dtype=torch.int32)
    scales = torch.rand(K // 128, N, dtype=torch.float16) * 0.01
    return pack_int4_along_k(q).to(device), scales.to(device)


@pytest.mark.parametrize("K,N", SHAPES, ids=lambda s: str(s))
def bench_int4_dequantize_cpu(benchmark, K, N):
    qweight, scales = _data(K, N, "cpu")
    benchmark.group = f"int4_dequantize {K}x{N}"
    benchmark(ops.int4_dequantize, qweight, scales, None, None, 128)
    nbytes = K * N // 2 + 2 * scales.numel() + 2 * K * N
    dense = torch.empty(K, N, dtype=torch.float16)
    out = torch.empty_like(dense)
    t_copy = timeit(lambda: out.copy_(dense))
    t_ref = timeit(lambda: reference.int4_dequantize(qweight, scales, None, None, 128), min_reps=3)
    case = f"K={K} N={N} g=128 fp16"
    record(
        Row("int4_dequantize", case, seconds_of(benchmark), nbytes, 0, "torch reference", t_ref),
        benchmark,
    )
    record(
        Row(
            "int4_dequantize",
            case + " (fp16 copy of the output)",
            t_copy,
            4 * K * N,
            0,
            "torch reference",
            t_ref,
        )
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("K,N", SHAPES, ids=lambda s: str(s))
def bench_int4_dequantize_gpu(benchmark, K, N, backend):
    qweight, scales = _data(K, N, "cuda")

    def run():
        ops.int4_dequantize(qweight, scales, None, None, 128, backend=backend)
        torch.cuda.synchronize()

    benchmark.group = f"int4_dequantize {K}x{N} cuda"
    benchmark(run)
    nbytes = K * N // 2 + 2 * scales.numel() + 2 * K * N
    t_ref = timeit(lambda: reference.int4_dequantize(qweight, scales, None, None, 128), "cuda")
    record(
        Row(
            "int4_dequantize",
            f"K={K} N={N} g=128 fp16 {backend}",
            seconds_of(benchmark),
            nbytes,
            0,
            "torch reference",
            t_ref,
            device="cuda",
        ),
        benchmark,
    )
