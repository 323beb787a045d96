"""Key/value cache for incremental causal dilated attention, exact and bounded.

Causal dilated attention is prefix-consistent: query ``t`` of head ``j`` sees, through pattern ``i``, the
keys ``u <= t`` of its own ``w_i``-segment whose phase ``(u mod w_i) mod r_i`` equals ``o_i(j)`` — and it
sees them only when its own phase is ``o_i(j)`` too. (``W_i = min(w_i, n)`` changes nothing for causal rows:
while ``n <= w_i`` every position lies in the first segment either way.) So for every (pattern, offset)
pair in use the cache keeps one buffer: the keys of the *current* segment with that phase, at most
``len(range(o, w_i, r_i)) <= ceil(w_i / r_i)`` of them, emptied when a new segment begins. Per query
head the cache holds at most ``Σ_i ceil(w_i / r_i)`` keys however long the history is (LongNet's
geometric configs keep ``w_i / r_i`` small, so this is well below the largest segment).

A step runs one small attention (:func:`attend_parts`) per head over the keys of the patterns whose phase
matches, concatenated: a key that ``C`` patterns select counts ``C`` times, which is exactly the
log-sum-exp merge of the full pass, so step ``t``'s output equals row ``t`` of the full causal forward pass
(to rounding). :func:`decode_attention` is the same step over a full key/value history (gathering the
rows by absolute position), for callers that keep the whole history.

Left-padded rows (``sequence_starts``, as in :func:`~dilated_attention_pytorch.dilated_attention`): row ``i``
is the sequence that begins at column ``start_i``, so its position is ``column - start_i`` and its phases
differ from other rows'. Rows advance in step, so rows with one start always hold the same fill: every
buffer keeps a fill length and a segment per *start group*; a step writes each group's keys at its own
length and masks each row's query to its own keys (one attention for the batch). Padding columns are
never stored, so whatever they hold never reaches a result. With one start (no padding) this is one group:
plain slices, no mask, nothing per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Union

import torch

from .. import _validation as V
from ..lru import cached
from ..patterns import OffsetRule, pattern_groups

__all__ = ["DecodingState", "DilatedKVCache", "decode_attention"]


@dataclass(frozen=True)
class _Slot:
    """One (pattern, offset) pair in use: its query heads, and the key/value heads it must keep."""

    pattern: int  # i
    segment: int  # w_i
    dilation: int  # r_i
    offset: int  # o
    heads: torch.Tensor  # (h,) bool: the query heads of this pattern with this offset
    kv_heads: tuple[int, ...]  # distinct key/value heads those query heads use (buffer order)
    kv_index: Optional[torch.Tensor]  # kv_heads as a tensor; None when they are all key/value heads
    kv_spread: Optional[torch.Tensor]  # (h_kv,) buffer index per key/value head (0 for those not kept)
    capacity: int  # len(range(offset, segment, dilation))


def decode_slots(
    segment_lengths, dilation_rates, offsets, head_groups, num_heads, num_kv_heads, device
) -> tuple[_Slot, ...]:
    """Every (pattern, offset) pair a causal row can use, with its query heads and key/value heads (cached:
    a decode step builds no tensors for them)."""
    key = offsets if isinstance(offsets, str) else tuple(tuple(int(o) for o in row) for row in offsets)
    return cached(_decode_slots, tuple(segment_lengths), tuple(dilation_rates), key, bool(head_groups), num_heads,
                  num_kv_heads, torch.device(device))


@lru_cache(maxsize=64)
def _decode_slots(segment_lengths, dilation_rates, offsets, head_groups, num_heads, num_kv_heads, device):
    group = num_heads // num_kv_heads
    longest = max(segment_lengths)  # W_i = min(w_i, longest) = w_i
    slots = []
    for pg in pattern_groups(longest, num_heads, segment_lengths, dilation_rates, offsets, head_groups):
        heads = torch.zeros(num_heads, dtype=torch.bool, device=device)
        heads[list(pg.heads)] = True
        capacity = -(-(pg.segment - pg.offset) // pg.dilation)  # len(range(o, w, r)), beyond ssize_t too
        kv_heads = tuple(sorted({j // group for j in pg.heads}))
        every = len(kv_heads) == num_kv_heads
        spread = [kv_heads.index(c) if c in kv_heads else 0 for c in range(num_kv_heads)]
        slots.append(_Slot(pg.pattern, pg.segment, pg.dilation, pg.offset, heads, kv_heads,
                           None if every else torch.tensor(kv_heads, device=device),
                           None if every else torch.tensor(spread, device=device), capacity))
    return tuple(slots)


def slots_by_pattern(slots: Sequence[_Slot]) -> list[tuple[int, int, dict[int, int]]]:
    """Per pattern: ``(segment, dilation, {offset: slot index})``."""
    by_pattern: dict[int, tuple[int, int, dict[int, int]]] = {}
    for idx, slot in enumerate(slots):
        by_pattern.setdefault(slot.pattern, (slot.segment, slot.dilation, {}))[2][slot.offset] = idx
    return list(by_pattern.values())


def active_slots(slots: Sequence[_Slot], by_pattern, t: int):
    """``(index, slot)`` of the slots row ``t`` uses: per pattern, the one whose offset is ``t``'s phase."""
    for segment, dilation, by_offset in by_pattern:
        idx = by_offset.get(t % segment % dilation)
        if idx is not None:
            yield idx, slots[idx]


def spread_kv(slot: _Slot, x: torch.Tensor) -> torch.Tensor:
    """A buffer ``(b, len(slot.kv_heads), L, d)`` over all key/value heads; a head the slot does not keep
    gets some kept head's rows, which no query head of it sees (attend_parts masks them)."""
    return x if slot.kv_spread is None else x.index_select(1, slot.kv_spread)


def attend_parts(scale: float, q: torch.Tensor, parts) -> torch.Tensor:
    """One query row per head, q ``(b, h, d)``, against the keys each active (pattern, offset) slot selects:
    ``parts`` holds ``(slot, keys, values, rows)``, keys/values ``(b, h_kv, L, d)``, ``rows`` None (every
    batch row sees all ``L`` keys) or a bool ``(b, L)`` of the keys each batch row sees; a row sees at most
    one slot per pattern (it has one phase per pattern). One small attention over the concatenated keys,
    the ``g`` query heads of a key/value head as its ``g`` query rows (no copy per query head), each masked
    to its own slots: a key selected by ``C`` patterns counts ``C`` times (a ``log C`` bonus), which is the
    log-sum-exp merge of the full pass. Scores in fp32 (fp64 for fp64), masked by selection, so a NaN or inf
    key of another head's slot never reaches a head; a head that attends a non-finite value gets NaN, one
    that does not is computed without it. -> ``(b, h, d)``; heads without keys give zeros."""
    b, h, d = q.shape
    if not parts:
        return torch.zeros_like(q)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = torch.cat([k for _, k, _, _ in parts], dim=2).to(acc)
    v = torch.cat([v for _, _, v, _ in parts], dim=2).to(acc)
    h_kv, length = k.shape[1], k.shape[2]
    rows = b if any(seen is not None for *_, seen in parts) else 1
    masks = []
    for slot, kk, _, seen in parts:
        m = slot.heads[None, :, None].expand(rows, h, kk.shape[2])
        masks.append(m if seen is None else m & seen[:, None, :])
    mask = torch.cat(masks, dim=2).view(rows, h_kv, h // h_kv, length)
    scores = (q.to(acc) * scale).view(b, h_kv, h // h_kv, d) @ k.transpose(-1, -2)  # (b, h_kv, g, L)
    p = torch.softmax(torch.where(mask, scores, float("-inf")), dim=-1)  # NaN rows: no keys, zeroed below
    bad = ~torch.isfinite(v).all(dim=-1)  # (b, h_kv, L): non-finite values, kept out of the product
    out = p @ torch.where(bad.unsqueeze(-1), 0.0, v)
    out = torch.where(((p > 0) & bad.unsqueeze(2)).any(dim=-1, keepdim=True), float("nan"), out)
    return torch.where(mask.any(dim=-1, keepdim=True), out, 0.0).view(b, h, d).to(q.dtype)


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    offsets: OffsetRule = "paper",
    head_groups: bool = False,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The last ``m`` rows of causal dilated attention over a full key/value history, without a pass over it.

    query ``(b, m, h, d)`` holds positions ``n-m .. n-1`` of key/value ``(b, n, h_kv, d)``. Each row gathers
    only the keys its patterns select (by absolute position: at most ``Σ_i ceil(w_i / r_i)`` per head) and
    merges them as the full pass does, so row ``i`` equals row ``n-m+i`` of the full causal pass (to
    rounding). Patterns are taken as validated (see :func:`~dilated_attention_pytorch.dilated_attention`).
    -> ``(b, m, h, d)`` in the query's dtype."""
    b, m, h, d = query.shape
    n, h_kv = key.shape[1], key.shape[2]
    if m > n or h % h_kv != 0:
        raise ValueError(f"query (b, m={m}, h={h}, d) must be the last rows of key (b, n={n}, h_kv={h_kv}, d) "
                         f"with m <= n and h a multiple of h_kv")
    scale = d**-0.5 if scale is None else float(scale)
    slots = decode_slots(segment_lengths, dilation_rates, offsets, head_groups, h, h_kv, query.device)
    by_pattern = slots_by_pattern(slots)
    outs = []
    for i in range(m):
        t = n - m + i
        parts = []
        for _, slot in active_slots(slots, by_pattern, t):
            rows = slice(t - t % slot.segment + slot.offset, t + 1, min(slot.dilation, n))  # segment's keys, phase
            parts.append((slot, key[:, rows].transpose(1, 2), value[:, rows].transpose(1, 2), None))
        outs.append(attend_parts(scale, query[:, i], parts))
    return torch.stack(outs, dim=1).to(query.dtype)


class _DecodeCache:
    """What both decoding caches share: the layer's shapes, device, dtype, scale and (pattern, offset) slots,
    the host's column counter, and the checks of a step's inputs."""

    def _setup(self, segment_lengths, dilation_rates, offsets, head_groups, num_heads: int, num_kv_heads: int,
               head_dim: int, scale: Optional[float], batch_size: int, device, dtype: torch.dtype) -> None:
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.batch_size, self.dtype = batch_size, dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        self.position = 0  # column of the next token (its position in a row that starts at column 0)
        self._slots = decode_slots(segment_lengths, dilation_rates, offsets, head_groups, num_heads, num_kv_heads,
                                   self.device)

    def _check(self, name: str, x: torch.Tensor, heads: int) -> None:
        expected = (self.batch_size, heads, self.head_dim)
        if x.dim() != 4 or (x.shape[0], x.shape[2], x.shape[3]) != expected:
            raise ValueError(
                f"{name} must have shape (batch={self.batch_size}, seq, heads={heads}, head_dim={self.head_dim}), "
                f"but got {tuple(x.shape)}"
            )


class DilatedKVCache(_DecodeCache):
    """Cache of one causal dilated self-attention layer for ``batch_size`` sequences decoded in step.

    Use: :meth:`fill` after a full causal pass over a prompt at positions ``0..n-1`` (or start empty),
    then :meth:`attend` for the next tokens. Keys and values are stored as the attention sees them
    (after rotary/XPOS). A buffer grows (doubling) with the keys of its current segment, up to its bound
    ``len(range(o, w_i, r_i))``, and then stays: the cache never holds more than the text decoded so far
    or one segment's keys, so a segment longer than any text (``w_i = 2**62``) costs only the text.

    Left-padded prompts: ``fill(key, value, sequence_starts)`` makes row ``i`` the sequence that begins at
    column ``start_i`` (:attr:`starts`); its positions and segments count from there, each buffer keeps a fill
    length per group of rows with one start, and the padding is never stored.
    """

    def __init__(
        self,
        *,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        offsets: OffsetRule,
        head_groups: bool,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: Optional[float],
        batch_size: int,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self._setup(segment_lengths, dilation_rates, offsets, head_groups, num_heads, num_kv_heads, head_dim, scale,
                    batch_size, device, dtype)
        self._set_starts((0,) * batch_size)
        self._by_pattern = slots_by_pattern(self._slots)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._lengths: list[list[int]] = []  # per buffer, per start group: keys held, all of segment _segments[idx][g]
        self._segments: list[list[int]] = []
        for slot in self._slots:
            shape = (batch_size, len(slot.kv_heads), 0, head_dim)  # grown by _reserve as keys arrive
            self._keys.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self._values.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self._lengths.append([0])
            self._segments.append([0])

    # -- size -------------------------------------------------------------------------------------
    @property
    def capacity_per_head(self) -> int:
        """Most keys any one query head can ever see through the cache (over all its patterns)."""
        per_head = [0] * self.num_heads
        for slot in self._slots:
            for j in slot.heads.nonzero().flatten().tolist():
                per_head[j] += slot.capacity
        return max(per_head)

    def numel(self) -> int:
        """Elements held by the key and value buffers (at most twice the keys of one segment per buffer)."""
        return sum(k.numel() + v.numel() for k, v in zip(self._keys, self._values))

    def stored_keys(self) -> int:
        """Keys currently held, summed over buffers and key/value heads: the most of any one sequence."""
        held = []
        for g, (start, _) in enumerate(self._groups):
            last = max(self.position - 1 - start, 0)  # the last token's position in these rows
            held.append(sum(lengths[g] * len(slot.kv_heads)
                            for lengths, slot, segments in zip(self._lengths, self._slots, self._segments)
                            if segments[g] >= last // slot.segment))  # the last token's segment or later
        return max(held)

    def _set_starts(self, starts: tuple[int, ...]) -> None:
        """Per row the column of its first token; rows with one start form a group (``slice(None)`` when
        there is one group, else a row index tensor), ``_row_group`` maps each row to its group."""
        self.starts = starts
        distinct = sorted(set(starts))
        if len(distinct) == 1:
            self._groups: list[tuple[int, Union[slice, torch.Tensor]]] = [(distinct[0], slice(None))]
            self._row_group = None
            return
        self._groups = [(x, torch.tensor([i for i, y in enumerate(starts) if y == x], device=self.device))
                        for x in distinct]
        self._row_group = torch.tensor([distinct.index(y) for y in starts], device=self.device)

    # -- writing ----------------------------------------------------------------------------------
    def _reserve(self, idx: int, length: int) -> None:
        """Make buffer ``idx`` hold at least ``length`` keys (``<=`` its slot's capacity), keeping its contents."""
        held = self._keys[idx].shape[2]
        if length <= held:
            return
        size = min(self._slots[idx].capacity, max(length, 2 * held, 8))
        for buffers in (self._keys, self._values):
            old = buffers[idx]
            new = old.new_zeros(old.shape[0], old.shape[1], size, old.shape[3])
            new[:, :, :held] = old
            buffers[idx] = new

    def fill(self, key: torch.Tensor, value: torch.Tensor, sequence_starts=None) -> None:
        """Take the keys/values ``(b, n, h_kv, d)`` of a prompt's full causal pass: columns ``0..n-1``, or with
        ``sequence_starts`` (ints ``< n``, one per row) row ``i``'s columns ``start_i..n-1`` (left padding)."""
        if self.position != 0:
            raise ValueError(f"fill() needs an empty cache, but the cache is at position {self.position}")
        self._check("key", key, self.num_kv_heads)
        self._check("value", value, self.num_kv_heads)
        n = key.shape[1]
        if sequence_starts is not None:
            self._set_starts(check_decode_starts(sequence_starts, self.batch_size, n))
        for idx, slot in enumerate(self._slots):
            step = min(slot.dilation, n)
            self._lengths[idx], self._segments[idx] = [], []
            for start, rows in self._groups:
                m = n - start  # the group's tokens; its current segment is that of its next position m
                lo = start + min(m, m - m % slot.segment + slot.offset)  # clamped: segments may exceed int64
                rows_k = key[rows, lo:n:step].transpose(1, 2)  # (rows, h_kv, L, d)
                rows_v = value[rows, lo:n:step].transpose(1, 2)
                if slot.kv_index is not None:
                    rows_k, rows_v = rows_k.index_select(1, slot.kv_index), rows_v.index_select(1, slot.kv_index)
                length = rows_k.shape[2]
                self._reserve(idx, length)
                self._keys[idx][rows, :, :length] = rows_k
                self._values[idx][rows, :, :length] = rows_v
                self._lengths[idx].append(length)
                self._segments[idx].append(m // slot.segment)
        self.position = n

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Next ``m`` tokens: query ``(b, m, h, d)``, key/value ``(b, m, h_kv, d)`` -> out ``(b, m, h, d)``."""
        self._check("query", query, self.num_heads)
        self._check("key", key, self.num_kv_heads)
        self._check("value", value, self.num_kv_heads)
        if not (query.shape[1] == key.shape[1] == value.shape[1]):
            raise ValueError(f"query, key and value must have one length, got {query.shape[1]}, {key.shape[1]}")
        outs = [self._step(query[:, i], key[:, i], value[:, i]) for i in range(query.shape[1])]
        return torch.stack(outs, dim=1)

    def _step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token per row at column ``self.position``: q ``(b, h, d)``, k/v ``(b, h_kv, d)`` -> ``(b, h, d)``."""
        out_dtype = q.dtype  # e.g. bfloat16 under autocast; the cache computes in its own dtype
        q, k, v = q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)
        parts = []
        for segment, dilation, by_offset in self._by_pattern:
            active: dict[int, list[int]] = {}  # slot index -> the start groups whose phase selects it
            for g, (start, _) in enumerate(self._groups):
                idx = by_offset.get((self.position - start) % segment % dilation)
                if idx is not None:
                    active.setdefault(idx, []).append(g)
            parts += [self._append(idx, groups, k, v) for idx, groups in active.items()]
        self.position += 1
        return attend_parts(self.scale, q, parts).to(out_dtype)

    def _append(self, idx: int, groups: list[int], k: torch.Tensor, v: torch.Tensor):
        """Write the rows of ``groups`` of key/value ``(b, h_kv, d)`` into buffer ``idx``, each group at its own
        fill length (a group whose segment changed starts over) -> the buffer's ``attend_parts`` entry."""
        slot, lengths, segments = self._slots[idx], self._lengths[idx], self._segments[idx]
        if slot.kv_index is not None:
            k, v = k.index_select(1, slot.kv_index), v.index_select(1, slot.kv_index)
        for g in groups:
            t = self.position - self._groups[g][0]  # the token's position in these rows
            if segments[g] != t // slot.segment:  # a new segment: nothing before it is visible any more
                segments[g], lengths[g] = t // slot.segment, 0
        size = max(lengths[g] for g in groups) + 1
        self._reserve(idx, size)
        for g in groups:
            rows = self._groups[g][1]
            self._keys[idx][rows, :, lengths[g]], self._values[idx][rows, :, lengths[g]] = k[rows], v[rows]
            lengths[g] += 1
        seen = None
        if self._row_group is not None:  # per row its group's keys; rows of another phase see none of these
            held = [0] * len(self._groups)
            for g in groups:
                held[g] = lengths[g]
            held_rows = torch.tensor(held, device=self.device)[self._row_group]  # (b,)
            seen = torch.arange(size, device=self.device) < held_rows[:, None]  # (b, L)
        keys, values = self._keys[idx][:, :, :size], self._values[idx][:, :, :size]
        return slot, spread_kv(slot, keys), spread_kv(slot, values), seen

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (e.g. after dropping finished sequences or for beam search)."""
        self._keys = [k.index_select(0, index) for k in self._keys]
        self._values = [v.index_select(0, index) for v in self._values]
        self.batch_size = int(index.numel())
        if self._row_group is None:  # one start: nothing per row to move (and no read of index on the host)
            self.starts = self.starts[:1] * self.batch_size
            return
        old = [start for start, _ in self._groups]  # every row of a group holds the same fill
        self._set_starts(tuple(self.starts[i] for i in index.tolist()))
        keep = [old.index(start) for start, _ in self._groups]
        self._lengths = [[lengths[g] for g in keep] for lengths in self._lengths]
        self._segments = [[segments[g] for g in keep] for segments in self._segments]


def check_decode_starts(starts, batch_size: int, n: int) -> tuple[int, ...]:
    """``sequence_starts`` of a prompt that decoding continues: one int per row in ``[0, n)`` (each row
    needs a token of its own to continue from)."""
    values = V.check_sequence_starts(starts, batch_size, n)
    for i, s in enumerate(values):
        if s >= n:
            raise ValueError(f"sequence_starts[{i}] must be < seq={n} before decoding (a row needs at least one "
                             f"token of its own), but got {s}")
    return values


class DecodingState:
    """Everything a model keeps between decoding steps: one :class:`DilatedKVCache` per self-attention layer
    and, for an encoder-decoder, the encoder memory's projected keys/values per cross-attention layer."""

    def __init__(
        self,
        layers: list[DilatedKVCache],
        memory_kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None,
        memory_padding_mask: Optional[torch.Tensor] = None,
    ) -> None:
        self.layers, self.memory_kv, self.memory_padding_mask = layers, memory_kv, memory_padding_mask

    @property
    def position(self) -> int:
        return self.layers[0].position

    def numel(self) -> int:
        """Elements held by the self-attention caches (bounded, fixed at construction)."""
        return sum(cache.numel() for cache in self.layers)
