"""Block planning: which kernel calls a dilated attention call makes, as integers only.

A :class:`Block` is one kernel call: the rows of one offset of one pattern (a strided set of rows,
:class:`~.patterns.RowSpan`) for a set of query heads. :func:`plan_blocks` lists them for a sequence,
:func:`chunk_bounds` cuts a sequence into chunks whose boundaries are segment boundaries of every
pattern, :func:`pieces` cuts a block's backward into calls of bounded size and
:func:`covering_pattern` finds the pattern whose gradients can be written rather than added. No
tensors are touched; :mod:`.views` turns blocks into views of tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Sequence, Union

from .patterns import OffsetRule, RowSpan, pattern_groups, row_spans

__all__ = ["Block", "HeadIndex", "all_heads", "as_index", "chunk_bounds", "covering_pattern", "index_key", "pieces",
           "plan_blocks"]

HeadIndex = Union[slice, tuple[int, ...]]


@dataclass(frozen=True)
class Block:
    """One kernel call: the rows of one offset of one pattern, for a set of query heads.

    A *diagonal* block (``diag_m`` set) instead covers every offset ``o`` of a pattern at once, for the
    heads ``j = o + r·diag_m`` (the ``"paper"`` rule gives head ``j`` the offset ``j mod r``): row
    offset and head advance together, which is again a strided view. It replaces ``r`` small calls by
    one call of ``r`` heads when ``h / r < r``.
    """

    span: RowSpan
    offset: int  # -1 for a diagonal block
    dilation: int
    heads: HeadIndex  # query heads, in the kernel's head order
    kv_heads: HeadIndex  # the key/value head of each query head (may repeat under GQA)
    pattern: int = -1
    diag_m: Optional[int] = None

    key: tuple = field(init=False, repr=False, compare=False)  # hashable (a slice is not before Python 3.12)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.span, self.offset, self.dilation, index_key(self.heads),
                                         index_key(self.kv_heads), self.pattern, self.diag_m))

    def head_list(self, num_heads: int) -> list[int]:
        if isinstance(self.heads, slice):
            return list(range(num_heads))[self.heads]
        return list(self.heads)

    def head_offset(self, position: int) -> int:
        """Offset of the block's ``position``-th head."""
        return position if self.diag_m is not None else self.offset


def index_key(index: HeadIndex) -> tuple:
    return (index.start, index.stop, index.step) if isinstance(index, slice) else ("at",) + tuple(index)


def as_index(heads: Sequence[int]) -> HeadIndex:
    """A slice when ``heads`` is an arithmetic progression without repeats (a view, no copy)."""
    if len(heads) == 1:
        return slice(heads[0], heads[0] + 1)
    step = heads[1] - heads[0]
    if step > 0 and all(b - a == step for a, b in zip(heads, heads[1:])):
        return slice(heads[0], heads[-1] + 1, step)
    return tuple(heads)


def all_heads(index: HeadIndex, num_heads: int) -> bool:
    return isinstance(index, slice) and range(num_heads)[index] == range(num_heads)


@lru_cache(maxsize=256)
def plan_blocks(
    n: int,
    num_heads: int,
    num_kv_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    offsets: OffsetRule,
    head_groups: bool,
    diagonal_blocks: bool = False,
) -> tuple[Block, ...]:
    """The kernel calls for ``n`` tokens. ``segment_lengths`` must already be the effective ``W_i``.
    ``diagonal_blocks`` allows diagonal blocks (not with key masks, whose rows would differ by head)."""
    group = num_heads // num_kv_heads
    groups = pattern_groups(n, num_heads, segment_lengths, dilation_rates, offsets, head_groups)
    blocks = []
    for i, (seg, r) in enumerate(zip(segment_lengths, dilation_rates)):
        mine = [pg for pg in groups if pg.pattern == i]
        diagonal = _diagonal_spans(n, num_heads, group, seg, r, mine) if diagonal_blocks else []
        for span in diagonal:
            for m in range(max(1, num_heads // r)):
                heads = slice(r * m, r * m + min(r, num_heads))  # heads o + r*m, in the order of their offsets o
                blocks.append(Block(span, -1, r, heads, heads, i, m))
        done = {span.start for span in diagonal}
        for pg in mine:
            heads, kv = as_index(pg.heads), as_index([j // group for j in pg.heads])
            for span in row_spans(n, pg.segment, pg.dilation, pg.offset):
                if span.start not in done:
                    blocks.append(Block(span, pg.offset, pg.dilation, heads, kv, i))
    return tuple(blocks)


def _diagonal_spans(n: int, num_heads: int, group: int, seg: int, r: int, mine) -> list[RowSpan]:
    """Spans of pattern ``(seg, r)`` that run as diagonal blocks: the heads' offsets are ``j mod r``
    for all heads, ``r`` divides the span's segment, keys are not shared (no GQA), and diagonal blocks
    are fewer than per-offset blocks: ``r`` divides ``h`` and ``h / r < r``, or ``h < r`` (one block of
    all heads, head ``j`` at offset ``j``)."""
    if r == 1 or group != 1 or num_heads == 1 or (num_heads >= r and (num_heads % r or num_heads // r >= r)):
        return []
    if sorted(j for pg in mine for j in pg.heads) != list(range(num_heads)):
        return []
    if any(j % r != pg.offset for pg in mine for j in pg.heads):
        return []
    spans, full = [], n // seg
    if full and seg % r == 0:
        spans.append(RowSpan(0, full, seg, seg // r))
    tail = n - full * seg
    if tail and tail % r == 0:
        spans.append(RowSpan(full * seg, 1, tail, tail // r))
    return spans


def chunk_bounds(n: int, segments: Sequence[int], target_tokens: int) -> list[tuple[int, int]]:
    """Chunks ``[c0, c1)`` whose boundaries are segment boundaries of every pattern.

    A chunk holds a multiple of ``lcm(W_i)`` tokens, about ``target_tokens`` (one chunk when the lcm
    is not much smaller than ``n``).
    """
    period = 1
    for w in segments:
        period = period * w // math.gcd(period, w)
        if period >= n:
            return [(0, n)]
    size = period * max(1, target_tokens // period)
    return [(c0, min(n, c0 + size)) for c0 in range(0, n, size)]


def pieces(b: int, count: int, rows: int, heads: int, limit: int) -> tuple[tuple[int, int, int, int], ...]:
    """``(c0, c1, h0, h1)`` ranges of a block's segments and heads with about ``limit`` token-heads each
    (one piece when the block is within the limit)."""
    if b * count * rows * heads <= limit:
        return ((0, count, 0, heads),)
    hh = heads if b * rows * heads <= limit else max(1, limit // (b * rows))
    cc = max(1, limit // (b * rows * hh))
    return tuple((c0, min(count, c0 + cc), h0, min(heads, h0 + hh))
                 for c0 in range(0, count, cc) for h0 in range(0, heads, hh))


def covering_pattern(blocks: Sequence[Block], m: int, num_heads: int) -> Optional[int]:
    """A pattern of dilation 1 whose blocks cover each of the ``m`` rows once, for all query heads in
    order (a slice), or None: its blocks can write gradients instead of adding them."""
    for i in sorted({bl.pattern for bl in blocks}):
        mine = [bl for bl in blocks if bl.pattern == i]
        if all(bl.dilation == 1 and bl.diag_m is None and all_heads(bl.heads, num_heads) for bl in mine) and \
                sum(bl.span.count * bl.span.segment for bl in mine) == m:
            return i
    return None
