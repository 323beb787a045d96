"""Useful work of dilated attention: only attended query-key pairs count."""

from __future__ import annotations

from typing import Sequence

from ..patterns import OffsetRule, pattern_groups, row_spans

__all__ = ["attended_pairs", "dense_pairs", "useful_flops"]


def _pairs(rows: int, causal: bool) -> int:
    return rows * (rows + 1) // 2 if causal else rows * rows


def attended_pairs(
    n: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    offsets: OffsetRule = "paper",
    head_groups: bool = False,
) -> int:
    """Query-key pairs attended per batch entry, summed over heads and patterns (a pair reached
    through two patterns is computed, and counted, twice)."""
    total = 0
    for pg in pattern_groups(n, num_heads, segment_lengths, dilation_rates, offsets, head_groups):
        for span in row_spans(n, pg.segment, pg.dilation, pg.offset):
            total += len(pg.heads) * span.count * _pairs(span.rows, is_causal)
    return total


def dense_pairs(n: int, num_heads: int, is_causal: bool) -> int:
    return num_heads * _pairs(n, is_causal)


def useful_flops(pairs: int, head_dim: int, batch: int, backward: bool) -> float:
    """4·d per pair forward (QKᵀ and PV); forward+backward counts 3.5× that."""
    fwd = 4.0 * head_dim * pairs * batch
    return fwd * 3.5 if backward else fwd
