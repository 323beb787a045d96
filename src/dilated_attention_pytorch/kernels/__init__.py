"""Kernels for one dense attention block, and the choice among them."""

from __future__ import annotations

from .aten import CpuFlashKernel, CudaFlashKernel
from .base import BlockInputs, BlockKernel, NoKernelError, acc_dtype
from .math import MathKernel

__all__ = ["BlockInputs", "BlockKernel", "NoKernelError", "KERNELS", "acc_dtype", "choose_kernel", "kernel_reasons"]

# In order of preference: the first kernel with no reasons against it runs.
KERNELS: tuple[BlockKernel, ...] = (CudaFlashKernel(), CpuFlashKernel(), MathKernel())


def kernel_reasons(inputs: BlockInputs) -> dict[str, list[str]]:
    """Every kernel's reasons for not running ``inputs`` (empty list: it can)."""
    return {kernel.name: kernel.not_supported_reasons(inputs) for kernel in KERNELS}


def choose_kernel(inputs: BlockInputs) -> BlockKernel:
    for kernel in KERNELS:
        if not kernel.not_supported_reasons(inputs):
            return kernel
    raise NoKernelError(f"no block kernel supports {inputs}: {kernel_reasons(inputs)}")
