"""Triton kernels of bitpress, importable as ``bitpress.triton_kernels``.

Each module holds the ``@triton.jit`` kernels of one feature and a launcher taking torch tensors.
On CPU tensors the launchers run the kernels under the Triton interpreter (that is how the tests
exercise them on machines without a GPU); on CUDA tensors they run compiled.
"""
