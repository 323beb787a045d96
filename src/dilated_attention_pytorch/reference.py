"""Dense float64 reference of dilated attention (README, "What it computes"): ``softmax(scale·QKᵀ + log C) V``.
Simple, O(n²), for tests; :func:`dense_attention` also serves the block-sparse reference."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .patterns import OffsetRule, head_groups_of, head_offsets

__all__ = ["count_matrix", "dense_attention", "reference_dilated_attention", "REFERENCE_MAX_SCORES"]

REFERENCE_MAX_SCORES = 1 << 28  # b * h * n * n entries at most


def count_matrix(
    n: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    offsets: OffsetRule = "paper",
    head_groups: bool = False,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """``C[j, t, u]``: the number of patterns through which query ``t`` of head ``j`` sees key ``u``."""
    t = torch.arange(n, device=device)
    counts = torch.zeros(num_heads, n, n, dtype=torch.float64, device=device)
    users = head_groups_of(num_heads, len(segment_lengths), head_groups)
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        seg_len = min(w, n)
        same_segment = (t[:, None] // seg_len) == (t[None, :] // seg_len)
        phase = (t % seg_len) % min(r, seg_len)  # the same phases: t mod W < W <= r otherwise
        for j, o in zip(users[i], head_offsets(offsets, i, r, users[i])):
            if o >= seg_len:  # no phase reaches it (and o may exceed int64)
                continue
            on = phase == o
            counts[j] += (same_segment & on[:, None] & on[None, :]).double()
    return counts


def reference_dilated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    offsets: OffsetRule = "paper",
    head_groups: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (b, n, h, d) float64, lse (b, h, n) float64); differentiable through autograd."""
    b, n, h, d = query.shape
    group = h // key.shape[2]
    scale = d**-0.5 if scale is None else scale
    q = query.double().transpose(1, 2)  # (b, h, n, d)
    k = key.double().repeat_interleave(group, dim=2).transpose(1, 2)
    v = value.double().repeat_interleave(group, dim=2).transpose(1, 2)
    if key_padding_mask is not None:  # padded keys never reach a result, whatever they hold (NaN, inf):
        valid = ~key_padding_mask[:, None, :, None]  # a masked score or 0 * NaN would still be NaN
        k, v = torch.where(valid, k, 0.0), torch.where(valid, v, 0.0)
    counts = count_matrix(n, h, segment_lengths, dilation_rates, offsets, head_groups, query.device)
    allowed = (counts > 0)[None]  # (1, h, n, n)
    if is_causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    return dense_attention(q, k, v, allowed, scale, torch.where(counts > 0, counts, 1.0).log())


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
                    bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scale·QKᵀ + bias)·V`` over the ``allowed`` keys, q/k/v ``(b, h, n, d)`` ->
    (out ``(b, n, h, d)``, lse ``(b, h, n)``); rows with no allowed key get zeros and LSE ``-inf``."""
    scores = scale * q @ k.transpose(-1, -2)
    scores = torch.where(allowed, scores if bias is None else scores + bias, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (b, h, n)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return (probs @ v).transpose(1, 2), lse
