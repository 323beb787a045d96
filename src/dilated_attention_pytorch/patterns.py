"""Index math of dilated attention: which rows each head covers in each pattern (README,
"What it computes").

Everything here is pure Python on integers; no tensors are touched. The functions are the one
source of truth for segments, head groups and offsets, used by every backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Union

from .lru import cached

__all__ = [
    "OffsetRule",
    "PatternGroup",
    "RowSpan",
    "head_groups_of",
    "head_offsets",
    "pattern_groups",
    "row_spans",
]

# "paper" | "torchscale" | "group" | explicit offsets[i][j]
OffsetRule = Union[str, Sequence[Sequence[int]]]
OFFSET_RULES = ("paper", "torchscale", "group")


@dataclass(frozen=True)
class PatternGroup:
    """Query heads that share one offset of one pattern: they cover the same rows."""

    pattern: int  # index i of the (segment, dilation) pair
    segment: int  # effective segment length W_i = min(w_i, n)
    dilation: int  # effective dilation min(r_i, W_i): a segment holds one row of offset o when r_i >= W_i
    offset: int  # o, in [0, min(r_i, W_i)): offsets >= W_i cover no row and have no group
    heads: tuple[int, ...]  # query heads (global indices, ascending)


@dataclass(frozen=True)
class RowSpan:
    """Rows ``start + s*segment + offset + dilation*k`` for ``s < count``, ``k < rows``.

    ``count`` segments of equal length ``segment`` beginning at ``start``; within each, the rows of
    one offset. A pattern on ``n`` tokens has at most two spans per offset: the full segments and the
    shorter last one.
    """

    start: int
    count: int
    segment: int
    rows: int


def head_groups_of(num_heads: int, num_patterns: int, head_groups: bool) -> list[range]:
    """Heads that use each pattern: all heads, or contiguous groups with group 0 first.

    With ``head_groups`` every pattern needs a group of at least one head: fewer heads than patterns
    would drop patterns, so that raises.
    """
    if not head_groups:
        return [range(num_heads)] * num_patterns
    if num_heads < num_patterns:
        raise ValueError(
            f"head_groups=True gives each pattern its own group of heads and needs at least one head per "
            f"pattern, but got num_heads={num_heads} for {num_patterns} patterns; use at least "
            f"{num_patterns} heads, fewer patterns, or head_groups=False"
        )
    groups, start = [], 0
    for i in range(num_patterns):
        size = num_heads // num_patterns + (1 if i < num_heads % num_patterns else 0)
        groups.append(range(start, start + size))
        start += size
    return groups


def head_offsets(rule: OffsetRule, pattern: int, dilation: int, heads: range) -> list[int]:
    """Offset ``o_i(j)`` for every head ``j`` in ``heads`` (the heads that use pattern ``i``)."""
    m = len(heads)
    if isinstance(rule, str):
        if rule == "paper":
            return [jj % dilation for jj in range(m)]
        if rule == "torchscale":
            per = max(1, math.ceil(m / dilation))
            return [jj // per for jj in range(m)]
        if rule == "group":
            return [pattern % dilation] * m
        raise ValueError(f"offsets must be one of {OFFSET_RULES} or a list of lists, but got {rule!r}")
    row = list(rule[pattern])
    if len(row) == m:  # indexed by j', the head's index among the heads that use the pattern
        return row
    return [row[j] for j in heads]  # indexed by the global head index (validated: len == num_heads)


@lru_cache(maxsize=256)
def _pattern_groups(
    n: int,
    num_heads: int,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    offsets: Union[str, tuple[tuple[int, ...], ...]],
    head_groups: bool,
) -> tuple[PatternGroup, ...]:
    groups = []
    users = head_groups_of(num_heads, len(segment_lengths), head_groups)
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        heads = users[i]
        seg = min(w, n)  # W_i; offsets and rows are plain Python ints, sizes beyond int64 included
        by_offset: dict[int, list[int]] = {}
        for j, o in zip(heads, head_offsets(offsets, i, r, heads)):
            if o < seg:  # (t mod W) mod r < W: a larger offset covers no row
                by_offset.setdefault(o, []).append(j)
        for o in sorted(by_offset):
            # with r >= W a segment holds the single row o: dilation W selects the same rows, and
            # every stride and index stays below n
            groups.append(PatternGroup(i, seg, min(r, seg), o, tuple(by_offset[o])))
    return tuple(groups)


def pattern_groups(
    n: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    offsets: OffsetRule = "paper",
    head_groups: bool = False,
) -> tuple[PatternGroup, ...]:
    """Every (pattern, offset) pair that covers rows of ``n`` tokens, with the query heads it serves.

    Segment, dilation and offset are effective: each is below or at ``n`` whatever ``w_i`` and ``r_i``
    are (``min(w_i, n)``, ``min(r_i, W_i)``), so sizes beyond int64 are fine. Cached (bounded LRU)."""
    key = offsets if isinstance(offsets, str) else tuple(tuple(int(o) for o in row) for row in offsets)
    return cached(_pattern_groups, n, num_heads, tuple(segment_lengths), tuple(dilation_rates), key, bool(head_groups))


def row_spans(n: int, segment: int, dilation: int, offset: int) -> list[RowSpan]:
    """The rows of one offset of one pattern on ``n`` tokens, as at most two :class:`RowSpan`."""
    spans = []
    full = n // segment
    rows = len(range(offset, segment, dilation))
    if full and rows:
        spans.append(RowSpan(0, full, segment, rows))
    tail = n - full * segment
    rows = len(range(offset, tail, dilation))
    if rows:
        spans.append(RowSpan(full * segment, 1, tail, rows))
    return spans
