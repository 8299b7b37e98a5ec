"""int4_gemm on the CPU: Llama-3-8B projection shapes, group 128, bf16 activations.

Cold cache: every measured call (ours and the baselines) takes the next of several copies of its
weights, together larger than the last-level cache, so each call streams its weights from DRAM.

Per case: our time; the floor = bytes of the weight in the kernel layout (nibbles, fp32 scales;
symmetric, so no zeros) / read bandwidth measured in this run; and two baselines measured in the
same run: F.linear with a dense bf16 weight, and torch's own INT4 CPU op
(_weight_int4pack_mm_for_cpu, group 128). GPU section: runs only with a CUDA GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from bench_util import Rotating, Row, cuda_timeit, record, seconds_of, timeit

from bitpress import ops
from bitpress.int4 import layout as int4_layout
from bitpress.int4.layout import Int4MmaTiles
from bitpress.int4.quantized import QuantizedWeight

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # Llama-3-8B: q/o, gate/up, down
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512]
GROUP = 128


def _weights(K, N):
    gen = torch.Generator().manual_seed(K + N)
    q = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(K // GROUP, N, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    qw = QuantizedWeight(
        q,
        scales,
        torch.full_like(scales, 8, dtype=torch.uint8),
        (torch.arange(K) // GROUP).to(torch.int32),
        GROUP,
        True,
    )
    packed = int4_layout.pack(qw)
    dense = qw.dequantize(torch.bfloat16).contiguous()  # [N, K]
    tq = torch._convert_weight_to_int4pack_for_cpu(q.t().contiguous().to(torch.int32), 2)
    sz = torch.stack([scales, -8 * scales], dim=-1).contiguous()  # w = q*s + (-8 s)
    return packed, dense, tq, sz


_CACHE = {}


def _rotations(K, N):
    if (K, N) not in _CACHE:
        _CACHE.clear()
        packed, dense, tq, sz = _weights(K, N)

        def copy_packed():
            return dataclasses.replace(
                packed, qweight=packed.qweight.clone(), scales=packed.scales.clone()
            )

        _CACHE[(K, N)] = (
            packed,
            Rotating(copy_packed, packed.nbytes),
            Rotating(lambda: dense.clone(), dense.numel() * 2),
            Rotating(lambda: (tq.clone(), sz.clone()), tq.numel() + sz.numel() * 2),
        )
    return _CACHE[(K, N)]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,N", SHAPES, ids=lambda s: str(s))
def bench_int4_gemm_cpu(benchmark, K, N, M):
    packed, r_packed, r_dense, r_tq = _rotations(K, N)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    benchmark.group = f"int4_gemm {K}x{N}"
    benchmark.pedantic(
        lambda: ops.int4_gemm(x, r_packed.next()), rounds=max(15, 256 // M), warmup_rounds=2
    )
    t_ours = seconds_of(benchmark)
    t_lin = timeit(lambda: F.linear(x, r_dense.next()))

    def int4pack():
        tq, sz = r_tq.next()
        return torch._weight_int4pack_mm_for_cpu(x, tq, GROUP, sz)

    t_tq = timeit(int4pack)
    case = f"K={K} N={N} M={M} bf16 g128"
    flops = 2 * M * K * N
    record(Row("int4_gemm", case, t_ours, packed.nbytes, flops, "F.linear bf16", t_lin), benchmark)
    record(Row("int4_gemm", case, t_ours, packed.nbytes, flops, "torch int4pack_mm", t_tq))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("M", [1, 16, 64])
@pytest.mark.parametrize("K,N", SHAPES, ids=lambda s: str(s))
def bench_int4_gemm_gpu(benchmark, K, N, M, backend):
    """GPU: the CUDA and Triton kernels (GPU mma layout, fp16 x), cold L2 (rotating copies of
    the weights, > 256 MiB together, against a 50-60 MiB L2), against F.linear fp16 (cuBLAS)
    with rotating dense weights, both timed with CUDA events over back-to-back calls. Bytes: the
    packed weight, scales, x and the output; the floor is bytes / 3.35 TB/s or FLOPs /
    990 TFLOP/s (H100 SXM), whichever is larger."""
    packed, dense, _, _ = _weights(K, N)
    packed = packed.to("cuda", layout=Int4MmaTiles)
    dense = dense.to("cuda", torch.float16)
    x = torch.randn(M, K, dtype=torch.float16, device="cuda")

    def copy_packed():
        return dataclasses.replace(
            packed, qweight=packed.qweight.clone(), scales=packed.scales.clone()
        )

    r_packed = Rotating(copy_packed, packed.nbytes)
    r_dense = Rotating(lambda: dense.clone(), dense.numel() * 2)
    benchmark.group = f"int4_gemm gpu {K}x{N}"

    def run():
        ops.int4_gemm(x, r_packed.next(), backend=backend)
        torch.cuda.synchronize()  # time the kernel, not the launch

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    t_ours = cuda_timeit(lambda: ops.int4_gemm(x, r_packed.next(), backend=backend))
    t_lin = cuda_timeit(lambda: F.linear(x, r_dense.next()))
    nbytes = packed.nbytes + M * K * 2 + M * N * 2
    record(
        Row(
            "int4_gemm_gpu",
            f"K={K} N={N} M={M} fp16 g128 {backend}",
            t_ours,
            nbytes,
            2 * M * K * N,
            "F.linear fp16",
            t_lin,
            device="cuda",
        ),
        benchmark,
    )
