"""The log-sum-exp merge of partial attention results: one place, used by every path."""

from __future__ import annotations

import torch

__all__ = ["merge_partials"]


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-normalised partial results over disjoint sets of (weighted) keys.

    ``out_* (..., D)`` and ``lse_* (...)`` in a float accumulation dtype. A row with ``lse = -inf``
    (no keys) contributes nothing; a row that is ``-inf`` on both sides stays zero with LSE ``-inf``.
    """
    lse_max = torch.maximum(lse_a, lse_b)
    shift = torch.where(torch.isfinite(lse_max), lse_max, torch.zeros_like(lse_max))
    w_a = torch.exp(lse_a - shift)
    w_b = torch.exp(lse_b - shift)
    total = w_a + w_b
    lse = shift + torch.log(total)  # log(0) = -inf for rows with no keys
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    out = (out_a * (w_a / safe_total)[..., None]) + (out_b * (w_b / safe_total)[..., None])
    return out, lse
