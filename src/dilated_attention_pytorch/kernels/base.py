"""What an attention kernel for one dense block is, and how one is chosen.

A *block* is a batch of independent dense attention problems in layout (B, H, L, D): query, key and
value have the same length L (a dilated segment), key/value heads already match the query heads.
Every kernel returns the output in the input dtype and the natural-log LSE (B, H, L) in float32
(float64 for float64 inputs), and has a backward that takes the output and LSE it must use — which
need not be its own: the portable path passes the output and LSE merged over all patterns, so that
each block's backward yields its exact share of the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

__all__ = ["BlockInputs", "BlockKernel", "NoKernelError", "acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of LSEs and of accumulations: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class BlockInputs:
    """What a kernel needs to know to say whether it can run a block."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    has_key_mask: bool
    dropout: bool
    needs_delta: bool  # backward must take an explicit delta (a gradient flows into the LSE)
    block_size: Optional[int] = None  # block-sparse calls: tokens per layout block


class NoKernelError(ValueError):
    """No kernel supports the inputs; the message lists every kernel's reasons."""


class BlockKernel(Protocol):
    name: str

    def not_supported_reasons(self, inputs: BlockInputs) -> list[str]: ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        key_valid: Optional[torch.Tensor],
        is_causal: bool,
        scale: float,
        dropout_p: float,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """-> (out (B,H,L,D), lse (B,H,L), rng_state for backward)."""
        ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        rng_state: Any,
        *,
        key_valid: Optional[torch.Tensor],
        is_causal: bool,
        scale: float,
        dropout_p: float,
        delta: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``lse`` is +inf on rows that see no key (their gradient is zero)."""
        ...
