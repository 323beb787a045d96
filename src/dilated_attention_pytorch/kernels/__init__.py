"""Kernels for one dense attention block, and the choice among them."""

from __future__ import annotations

from ..capabilities import first_supported
from .aten import CpuFlashKernel, CudaFlashKernel, CudnnKernel
from .base import BlockInputs, BlockKernel, NoKernelError, acc_dtype, has_key, host_checks
from .math import MathKernel
from .triton_gather import gather_blocks  # registers the gather-merge custom op (imports no triton)

__all__ = [
    "BlockInputs", "BlockKernel", "FUSED_KERNELS", "KERNELS", "NoKernelError", "acc_dtype", "choose_kernel",
    "gather_blocks", "has_key", "host_checks", "kernel_reasons",
]

# The portable path's kernels, in order of preference: the first with no reasons against it runs.
KERNELS: tuple[BlockKernel, ...] = (CudnnKernel(), CudaFlashKernel(), CpuFlashKernel(), MathKernel())
# The fused GPU path's kernels.
FUSED_KERNELS: tuple[BlockKernel, ...] = (CudnnKernel(),)


def kernel_reasons(inputs: BlockInputs, kernels: tuple[BlockKernel, ...] = KERNELS) -> dict[str, list[str]]:
    """Every kernel's reasons for not running ``inputs`` (empty list: it can)."""
    return {kernel.name: kernel.not_supported_reasons(inputs) for kernel in kernels}


def choose_kernel(inputs: BlockInputs, kernels: tuple[BlockKernel, ...] = KERNELS) -> BlockKernel:
    """The first of ``kernels`` that supports ``inputs``; NoKernelError lists every kernel's reasons."""
    return first_supported(kernels, inputs, "no block kernel supports these inputs", NoKernelError)[0]
