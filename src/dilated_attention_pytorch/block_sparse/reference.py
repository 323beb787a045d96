"""Dense float64 reference of block-sparse attention (README, "Block-sparse attention"): O(n²), for tests only."""

from __future__ import annotations

import torch

from ..reference import dense_attention

__all__ = ["layout_to_token_mask", "reference_block_sparse_attention"]


def layout_to_token_mask(
    layout: torch.Tensor, seq_len: int, block_size: int, num_heads: int, is_causal: bool
) -> torch.Tensor:
    """(h, n, n) bool: query ``t`` of head ``j`` sees key ``u``."""
    mask = layout.expand(num_heads, -1, -1).repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    mask = mask[:, :seq_len, :seq_len]
    if is_causal:
        mask = mask & torch.ones(seq_len, seq_len, dtype=torch.bool, device=layout.device).tril()
    return mask


def reference_block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: torch.Tensor,
    *,
    block_size: int,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (b, n, h, d) float64, lse (b, h, n) float64); differentiable through autograd."""
    b, n, h, d = query.shape
    q, k, v = (x.double().repeat_interleave(h // x.shape[2], dim=2).transpose(1, 2) for x in (query, key, value))
    allowed = layout_to_token_mask(layout, n, block_size, h, is_causal)[None]  # (1, h, n, n)
    return dense_attention(q, k, v, allowed, d**-0.5 if scale is None else scale)
