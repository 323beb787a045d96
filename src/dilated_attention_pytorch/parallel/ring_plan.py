"""Which rows each rank computes locally and which dilated key/value rows move between ranks.

Pure index math over :func:`~dilated_attention_pytorch.patterns.pattern_groups`: every rank derives the
same plan from the same arguments, so sends and receives match without negotiation.

Rank ``p`` of ``P`` holds positions ``[p·n_local, (p+1)·n_local)`` of a sequence of ``N = P·n_local``.
For a pattern group (segment ``W = min(w, N)``, dilation ``r``, offset ``o``):

- a segment inside one shard is computed on its owner with no communication (LongNet §3.1);
- a segment that crosses a shard boundary ("spanning") involves only the ranks it touches: each of
  them sends its dilated rows of that segment (``o + r·k``) to the others of the segment — or, when
  causal, only to the later ones, since a query never sees a later key. A rank's own rows of a
  spanning segment are computed locally (causal: its own lower triangle).

Rows of the shard tiled by whole segments of every pattern (the core, a multiple of ``lcm(W_i)`` at
both ends) see only keys of the core; the caller runs single-device attention on them, and the plan's
own blocks cover the other rows only.

A spanning segment touches at most ``ceil(W / n_local) + 1`` ranks and each rank at most two of them
per pattern group, so the rows a rank sends do not grow with ``N`` for fixed ``w``/``r``. A rank's plan
looks only at its own (at most two per group) spanning segments and its own transfers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Union

from ..patterns import OffsetRule, RowSpan, pattern_groups
from ..planning import Block, as_index, plan_blocks

__all__ = ["RemoteCall", "RingPlan", "Transfer", "ring_plan"]


@dataclass(frozen=True)
class Transfer:
    """Dilated rows of one pattern group in one spanning segment, sent from ``src`` to ``dst``."""

    group: int  # index into pattern_groups(...)
    segment: int
    src: int
    dst: int
    src_rows: Block  # the rows on ``src``, in src-local positions (count 1, offset 0, dilation r)
    kv_heads: tuple[int, ...]  # key/value heads sent (each once, ascending)
    rows: int


@dataclass(frozen=True)
class RemoteCall:
    """One kernel call on this rank: its query rows of one spanning segment against keys received."""

    q_rows: Block  # local query rows, heads and (unused) kv heads
    keys: tuple[tuple[tuple[int, ...], int], ...]  # per query head: (indices into RingPlan.recv_transfers,
    # the key/value head: index into those transfers' kv_heads); every head the same number of keys
    slot: tuple[int, int, int]  # (pattern, kind, offset) of q_rows, as RingPlan.own_slots
    with_own: bool = False  # the keys also hold this rank's own rows of the segment (first), and q_rows is
    # no own block: one call per segment instead of two (non-causal, no core)


@dataclass(frozen=True, eq=False)  # hashed by identity: plans are cached, one object per call's settings
class RingPlan:
    world: int
    rank: int
    n_local: int
    n_total: int
    local_only: bool  # no segment of any pattern crosses a shard boundary (same answer on every rank)
    core: tuple[int, int]  # local rows [a, b) computed by single-device attention on them; a == b: none
    own_blocks: tuple[Block, ...]  # query rows against this rank's own keys (local coordinates), off the core
    sends: tuple[tuple[int, tuple[Transfer, ...]], ...]  # (peer, transfers), peers ascending
    recvs: tuple[tuple[int, tuple[Transfer, ...]], ...]  # (peer, transfers), peers ascending
    remote_calls: tuple[RemoteCall, ...]
    patterns: tuple[tuple[int, int], ...] = ()  # (W_i, r_i) per pattern index
    own_slots: tuple[tuple[int, int, int], ...] = ()  # per own block: (pattern, kind, offset), kind 0: whole
    # segments, 1: the segment cut at the shard's end (or the sequence's short last one), 2: the segment
    # that began on an earlier rank (the fused merge's placement, :class:`~..executor.Gather`)
    num_heads: int = 0

    @property
    def recv_transfers(self) -> tuple[Transfer, ...]:
        return tuple(t for _, ts in self.recvs for t in ts)

    def rows_sent(self) -> int:
        """Key rows × key/value heads this rank sends per forward (values: as many again)."""
        return sum(t.rows * len(t.kv_heads) for _, ts in self.sends for t in ts)

    def forward_bytes_sent(self, batch: int, head_dim: int, itemsize: int, with_mask: bool = False) -> int:
        """Bytes this rank sends in one forward: keys and values (and key masks) of the rows it shares."""
        return _bytes(self.sends, batch, head_dim, itemsize, with_mask)

    def forward_bytes_received(self, batch: int, head_dim: int, itemsize: int, with_mask: bool = False) -> int:
        """Bytes this rank receives in one forward (its receive buffers, all posted at once)."""
        return _bytes(self.recvs, batch, head_dim, itemsize, with_mask)


def _bytes(by_peer, batch: int, head_dim: int, itemsize: int, with_mask: bool) -> int:
    """Keys and values of every transfer, and per message its key-mask entries padded to whole rows
    (:mod:`.ring_wire`)."""
    total = 0
    for _, ts in by_peer:
        total += 2 * batch * sum(t.rows * len(t.kv_heads) for t in ts) * head_dim * itemsize
        if with_mask:
            total += -(-batch * sum(t.rows for t in ts) // head_dim) * head_dim * itemsize
    return total


def _rows_of(start: int, stop: int, seg_start: int, offset: int, dilation: int) -> tuple[int, int]:
    """Dilated indices ``k`` with ``seg_start + offset + dilation·k`` in ``[start, stop)``: -> (k_lo, k_hi)."""
    first = start - seg_start - offset
    last = stop - seg_start - offset
    k_lo = max(0, -(-first // dilation))
    k_hi = max(0, -(-last // dilation))
    return k_lo, max(k_lo, k_hi)


def _strided_block(start: int, count: int, dilation: int, heads, kv_heads) -> Block:
    """``count`` rows ``start + dilation·k`` as a portable Block (one segment, offset 0)."""
    return Block(RowSpan(start, 1, (count - 1) * dilation + 1, count), 0, dilation, heads, kv_heads)


@lru_cache(maxsize=128)
def _ring_plan(
    world: int,
    rank: int,
    n_local: int,
    num_heads: int,
    num_kv_heads: int,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    offsets: Union[str, tuple[tuple[int, ...], ...]],
    head_groups: bool,
    is_causal: bool,
    with_core: bool = True,
    diagonal_blocks: bool = False,
) -> RingPlan:
    n = world * n_local
    qpk = num_heads // num_kv_heads
    groups = pattern_groups(n, num_heads, segment_lengths, dilation_rates, offsets, head_groups)
    lo, hi = rank * n_local, (rank + 1) * n_local
    # The core: the largest range [A, B) of this shard tiled by whole segments of every pattern
    # (A, B multiples of lcm(W_i)). Its rows see only its keys, so single-device dilated_attention on
    # it is exact; the plan's blocks cover the rest of the shard (the margins) only.
    period = 1
    for pg in groups:
        period = period * pg.segment // math.gcd(period, pg.segment)
    core_a, core_b = -(-lo // period) * period, (hi // period) * period
    if core_b <= core_a or not with_core:
        core_a = core_b = lo
    own: list[Block] = []
    own_slots: list[tuple[int, int, int]] = []
    patterns: dict[int, tuple[int, int]] = {pg.pattern: (pg.segment, pg.dilation) for pg in groups}
    # Without a core, a pattern whose segments tile every shard runs as on one device on the shard (its
    # blocks from plan_blocks: diagonal blocks where they are fewer calls); the loop below does the rest.
    tiling = set() if with_core else {i for i, (w, _) in patterns.items() if n_local % w == 0}
    if tiling:
        shard_segments = tuple(min(patterns.get(i, (n_local, 1))[0], n_local) for i in range(max(patterns) + 1))
        for bl in plan_blocks(n_local, num_heads, num_kv_heads, shard_segments,
                              tuple(patterns.get(i, (1, 1))[1] for i in range(max(patterns) + 1)), offsets,
                              head_groups, diagonal_blocks):
            if bl.pattern in tiling:
                own.append(bl)
                own_slots.append((bl.pattern, 0, -1))
    # Patterns whose offsets run together as diagonal blocks (no core, no key mask): whole segments, and
    # a spanning segment's rows and received rows where the offsets line up (``_spanning_calls``).
    diagonal = {i for i in set(patterns) - tiling if not with_core and diagonal_blocks and
                _diagonal(groups, i, num_heads, qpk)}
    for i in sorted(diagonal):
        W, r = patterns[i]
        first = -(-lo // W)
        count = max(0, (min(hi, (n // W) * W) - first * W) // W)
        tail_start = (n // W) * W  # the sequence's short last segment, if this shard holds it
        tail = n - tail_start if tail_start < n and lo <= tail_start and n <= hi else 0
        for kind, span in ((0, RowSpan(first * W - lo, count, W, W // r)),
                           (1, RowSpan(tail_start - lo, 1, tail, tail // r))):
            if span.count and span.segment and span.segment % r == 0:
                for m in range(max(1, num_heads // r)):
                    heads = slice(r * m, r * m + min(r, num_heads))
                    own.append(Block(span, -1, r, heads, heads, i, m))
                    own_slots.append((i, kind, -1))
    transfers: list[Transfer] = []  # this rank's transfers (sent or received), in one canonical order
    spanning_mine: list[tuple[int, int, Block]] = []  # (group, segment, my query rows)
    # Some segment crosses a shard boundary iff some segment length does not divide n_local.
    local_only = world == 1 or all(n_local % pg.segment == 0 for pg in groups)
    for gi, pg in enumerate(groups):
        W, r, o = pg.segment, pg.dilation, pg.offset
        if pg.pattern in tiling:
            continue
        heads = as_index(pg.heads)
        kv_of_head = [j // qpk for j in pg.heads]
        kv_heads = tuple(sorted(set(kv_of_head)))
        kv_index = as_index(kv_of_head)
        # The segments of this shard crossing a shard boundary: at most its first and its last (only
        # those: the plan of one rank never enumerates the whole sequence).
        spanning = [s for s in sorted({lo // W, (hi - 1) // W})
                    if (s * W) // n_local != (min((s + 1) * W, n) - 1) // n_local]
        for s in spanning:
            ss, se = s * W, min((s + 1) * W, n)
            ranks = range(ss // n_local, (se - 1) // n_local + 1)
            rows = {q: _rows_of(max(ss, q * n_local), min(se, (q + 1) * n_local), ss, o, r) for q in ranks}
            mine = None  # this rank's rows of the segment: its queries, and what it sends
            if rows[rank][1] > rows[rank][0]:
                k_lo, k_hi = rows[rank]
                mine = _strided_block(ss + o + r * k_lo - lo, k_hi - k_lo, r, heads, kv_index)
            pairs = [(src, rank) for src in ranks] + [(rank, dst) for dst in ranks]  # those of this rank
            for src, dst in sorted(pairs, key=lambda sd: (sd[1], sd[0])):
                if src == dst or (is_causal and src > dst) or rows[src][1] == rows[src][0] or \
                        rows[dst][1] == rows[dst][0]:
                    continue
                k_lo, k_hi = rows[src]
                block = mine if src == rank else _strided_block(ss + o + r * k_lo - src * n_local, k_hi - k_lo, r,
                                                                heads, kv_index)
                transfers.append(Transfer(gi, s, src, dst, block, kv_heads, k_hi - k_lo))
            if mine is not None:
                spanning_mine.append((gi, s, mine, (pg.pattern, 2 if ss < lo else 1, o)))
        # Segments wholly inside this shard: full-length ones as one span, the short last one apart.
        first = -(-lo // W)  # first segment starting at or after lo
        full_end = min(hi, (n // W) * W)  # full segments end by here
        count = max(0, (full_end - first * W) // W)
        rows_full = len(range(o, W, r))
        # Full segments [first, first + count) minus those in the core: at most two runs.
        core_first, core_end = core_a // W, core_b // W
        runs = [(first, min(first + count, core_first)), (max(first, core_end), first + count)]
        if core_b == core_a:
            runs = [(first, first + count)]
        for s0, s1 in runs:
            if s1 > s0 and rows_full and not (pg.pattern in diagonal and W % r == 0):
                own.append(Block(RowSpan(s0 * W - lo, s1 - s0, W, rows_full), o, r, heads, kv_index))
                own_slots.append((pg.pattern, 0, o))
        tail_start = (n // W) * W
        diagonal_tail = pg.pattern in diagonal and (n - tail_start) % r == 0  # (above)
        if tail_start < n and lo <= tail_start and n <= hi and not diagonal_tail:
            rows_tail = len(range(o, n - tail_start, r))
            if rows_tail:
                own.append(Block(RowSpan(tail_start - lo, 1, n - tail_start, rows_tail), o, r, heads, kv_index))
                own_slots.append((pg.pattern, 1, o))

    sends = _by_peer([t for t in transfers if t.src == rank], lambda t: t.dst)
    recvs = _by_peer([t for t in transfers if t.dst == rank], lambda t: t.src)
    flat = [t for _, ts in recvs for t in ts]
    received: dict[tuple[int, int], list[int]] = {}  # (group, segment) -> indices into flat
    for i, t in enumerate(flat):
        received.setdefault((t.group, t.segment), []).append(i)
    calls = []
    work = _spanning_calls(spanning_mine, groups, diagonal, num_heads, n_local)
    while work:
        items, m = work.pop(0)
        heads_of = [(gi, s, groups[gi].heads if m is None else (groups[gi].offset + groups[gi].dilation * m,))
                    for gi, s, *_ in items]
        keys = []
        for gi, s, heads in heads_of:
            idx = tuple(received.get((gi, s), ()))
            keys += [(idx, flat[idx[0]].kv_heads.index(j // qpk) if idx else 0) for j in heads]
        if len({sum(flat[i].rows for i in idx) for idx, _ in keys}) > 1:  # offsets receive unequal rows
            work[:0] = [([entry], None) for entry in items]
            continue
        _, _, mine, slot = items[0]
        if m is not None:  # every offset of one segment, heads r·m + o at offset o: one diagonal block
            r, rows = mine.dilation, mine.span.rows
            heads = slice(r * m, r * m + len(items))
            mine = Block(RowSpan(mine.span.start, 1, rows * r, rows), -1, r, heads, heads, slot[0], m)
            slot = (slot[0], slot[1], -1)
        with_own = bool(keys[0][0]) and not is_causal and not with_core
        if not with_own:
            own.append(mine)
            own_slots.append(slot)
        if keys[0][0]:
            calls.append(RemoteCall(mine, tuple(keys), slot, with_own))
    core = (core_a - lo, core_b - lo)
    return RingPlan(world, rank, n_local, n, local_only, core, tuple(own), sends, recvs, tuple(calls),
                    tuple(patterns.get(i, (1, 1)) for i in range(max(patterns) + 1)), tuple(own_slots), num_heads)


def _diagonal(groups, pattern: int, num_heads: int, qpk: int) -> bool:
    """Whether pattern ``pattern``'s offsets can run as diagonal blocks (:func:`~..planning.plan_blocks`):
    no GQA, head ``j`` at offset ``j mod r``, and fewer calls than one per offset (``h <= r``, or ``r``
    divides ``h`` and ``h / r < r``)."""
    mine = [pg for pg in groups if pg.pattern == pattern]
    r = mine[0].dilation
    if qpk != 1 or r == 1 or num_heads == 1 or (num_heads > r and (num_heads % r or num_heads // r >= r)):
        return False
    return sorted(j for pg in mine for j in pg.heads) == list(range(num_heads)) and \
        all(pg.heads == tuple(range(pg.offset, num_heads, r)) for pg in mine)


def _spanning_calls(spanning_mine, groups, diagonal: set, num_heads: int, n_local: int) -> list[tuple[list, object]]:
    """The spanning (group, segment, rows, slot) entries as kernel calls: ``(entries, m)`` with ``m`` the
    diagonal block's head block where every offset of a segment runs together (a pattern in
    ``diagonal``, the same rows for every offset, inside the shard), else ``([entry], None)``."""
    by_segment: dict[tuple[int, int], list] = {}
    for entry in spanning_mine:
        by_segment.setdefault((entry[3][0], entry[1]), []).append(entry)
    out: list[tuple[list, object]] = []
    for (pattern, _), items in by_segment.items():
        items = sorted(items, key=lambda e: groups[e[0]].offset)
        blocks = [mine for _, _, mine, _ in items]
        r = blocks[0].dilation
        lined_up = (pattern in diagonal and len(items) == min(r, num_heads)
                    and all(groups[gi].offset == o for o, (gi, *_) in enumerate(items))
                    and all(b.span.rows == blocks[0].span.rows and b.span.start == blocks[0].span.start + o
                            for o, b in enumerate(blocks))
                    and blocks[0].span.start + blocks[0].span.rows * r <= n_local)
        if lined_up:
            out += [(items, m) for m in range(max(1, num_heads // r))]
        else:
            out += [([entry], None) for entry in items]
    return out


def _by_peer(transfers: list[Transfer], peer_of) -> tuple[tuple[int, tuple[Transfer, ...]], ...]:
    peers: dict[int, list[Transfer]] = {}
    for t in transfers:
        peers.setdefault(peer_of(t), []).append(t)
    return tuple((p, tuple(peers[p])) for p in sorted(peers))


def ring_plan(
    world: int,
    rank: int,
    n_local: int,
    num_heads: int,
    num_kv_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    offsets: OffsetRule = "paper",
    head_groups: bool = False,
    is_causal: bool = False,
    with_core: bool = True,
    diagonal_blocks: bool = False,
) -> RingPlan:
    """The plan of rank ``rank`` (cached, bounded LRU). Arguments are assumed validated. ``with_core=False``:
    no core (:attr:`RingPlan.core` empty), the own blocks cover the whole shard, each pattern's whole
    segments as one block (what the fused merge places); ``diagonal_blocks`` (no key mask) lets patterns
    whose segments tile the shards run diagonal blocks."""
    key = offsets if isinstance(offsets, str) else tuple(tuple(int(o) for o in row) for row in offsets)
    return _ring_plan(
        world, rank, n_local, num_heads, num_kv_heads, tuple(segment_lengths), tuple(dilation_rates), key,
        bool(head_groups), bool(is_causal), bool(with_core), bool(diagonal_blocks),
    )
