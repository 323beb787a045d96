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
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..lru import cached
from ..patterns import OffsetRule, pattern_groups

_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

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


def attend_parts(scale: float, q: torch.Tensor, parts) -> torch.Tensor:
    """One query row per head, q ``(b, h, d)``, against the keys each active (pattern, offset) slot selects:
    ``parts`` holds ``(slot, keys, values)``, keys/values ``(b, h_kv, L, d)``, at most one slot per pattern
    (a row has one phase per pattern). One small attention over the concatenated keys, each head masked to
    its own slots: a key selected by ``C`` patterns counts ``C`` times (a ``log C`` bonus), which is the
    log-sum-exp merge of the full pass. -> ``(b, h, d)``; heads without keys give zeros."""
    b, h, d = q.shape
    if not parts:
        return torch.zeros_like(q)
    k = torch.cat([k for _, k, _ in parts], dim=2)
    v = torch.cat([v for _, _, v in parts], dim=2)
    h_kv, length = k.shape[1], k.shape[2]
    mask = torch.cat([slot.heads[:, None].expand(h, kk.shape[2]) for slot, kk, _ in parts], dim=1)
    # Each query head gets its own copy of its key/value head's rows with the columns it does not see
    # zeroed: a masked score is q·k before the mask, so a NaN or inf key of another head's slot would
    # otherwise reach this head's output.
    mask = mask.view(1, h, 1, length)
    k, v = (torch.where(mask.transpose(2, 3), x.repeat_interleave(h // h_kv, dim=1), 0.0) for x in (k, v))
    # not cuDNN: it builds an execution plan for every new key length, i.e. at every decode step
    with sdpa_kernel(_DECODE_BACKENDS):
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale)  # (b, h, 1, d)
    return torch.where(mask.any(dim=-1, keepdim=True), out, 0.0).view(b, h, d)  # no keys: zeros, not NaN


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
            parts.append((slot, key[:, rows].transpose(1, 2), value[:, rows].transpose(1, 2)))  # (b, h_kv, L, d)
        outs.append(attend_parts(scale, query[:, i], parts))
    return torch.stack(outs, dim=1).to(query.dtype)


class DilatedKVCache:
    """Cache of one causal dilated self-attention layer for ``batch_size`` sequences decoded in step.

    Use: :meth:`fill` after a full causal pass over a prompt at positions ``0..n-1`` (or start empty),
    then :meth:`attend` for the next tokens. Keys and values are stored as the attention sees them
    (after rotary/XPOS). A buffer grows (doubling) with the keys of its current segment, up to its bound
    ``len(range(o, w_i, r_i))``, and then stays: the cache never holds more than the text decoded so far
    or one segment's keys, so a segment longer than any text (``w_i = 2**62``) costs only the text.
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
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.batch_size, self.dtype = batch_size, dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        self.position = 0  # absolute position of the next token
        self._slots = decode_slots(segment_lengths, dilation_rates, offsets, head_groups, num_heads, num_kv_heads,
                                   self.device)
        self._by_pattern = slots_by_pattern(self._slots)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._lengths: list[int] = []  # keys held per buffer, all of segment self._segments[idx]
        self._segments: list[int] = []
        for slot in self._slots:
            shape = (batch_size, len(slot.kv_heads), 0, head_dim)  # grown by _reserve as keys arrive
            self._keys.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self._values.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self._lengths.append(0)
            self._segments.append(0)

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
        """Keys currently held, summed over buffers and key/value heads (one sequence)."""
        return sum(n * len(s.kv_heads) for n, s, seg in zip(self._lengths, self._slots, self._segments)
                   if seg >= max(self.position - 1, 0) // s.segment)  # the last token's segment or later

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

    def _check(self, name: str, x: torch.Tensor, heads: int) -> None:
        expected = (self.batch_size, heads, self.head_dim)
        if x.dim() != 4 or (x.shape[0], x.shape[2], x.shape[3]) != expected:
            raise ValueError(
                f"{name} must have shape (batch={self.batch_size}, seq, heads={heads}, head_dim={self.head_dim}), "
                f"but got {tuple(x.shape)}"
            )

    def fill(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Take the keys/values ``(b, n, h_kv, d)`` of positions ``0..n-1`` (a prompt's full pass)."""
        if self.position != 0:
            raise ValueError(f"fill() needs an empty cache, but the cache is at position {self.position}")
        self._check("key", key, self.num_kv_heads)
        self._check("value", value, self.num_kv_heads)
        n = key.shape[1]
        for idx, slot in enumerate(self._slots):
            # current segment of the *next* position n; bounds clamped to n (segments may exceed int64)
            start = min(n, n - n % slot.segment + slot.offset)
            step = min(slot.dilation, n)
            rows_k = key[:, start:n:step].transpose(1, 2)  # (b, h_kv, m, d)
            rows_v = value[:, start:n:step].transpose(1, 2)
            if slot.kv_index is not None:
                rows_k, rows_v = rows_k.index_select(1, slot.kv_index), rows_v.index_select(1, slot.kv_index)
            m = rows_k.shape[2]
            self._reserve(idx, m)
            self._keys[idx][:, :, :m] = rows_k
            self._values[idx][:, :, :m] = rows_v
            self._lengths[idx], self._segments[idx] = m, n // slot.segment
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
        """One token at ``self.position``: q ``(b, h, d)``, k/v ``(b, h_kv, d)`` -> ``(b, h, d)``."""
        t = self.position
        out_dtype = q.dtype  # e.g. bfloat16 under autocast; the cache computes in its own dtype
        q, k, v = q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)
        parts = []
        for idx, slot in active_slots(self._slots, self._by_pattern, t):
            if self._segments[idx] != t // slot.segment:  # a new segment: nothing before it is visible any more
                self._segments[idx], self._lengths[idx] = t // slot.segment, 0
            m = self._lengths[idx]
            self._reserve(idx, m + 1)
            every = slot.kv_index is None
            self._keys[idx][:, :, m] = k if every else k.index_select(1, slot.kv_index)
            self._values[idx][:, :, m] = v if every else v.index_select(1, slot.kv_index)
            self._lengths[idx] = m + 1
            parts.append((slot, self._full(slot, self._keys[idx][:, :, : m + 1]),
                          self._full(slot, self._values[idx][:, :, : m + 1])))
        self.position = t + 1
        return attend_parts(self.scale, q, parts).to(out_dtype)

    def _full(self, slot: _Slot, x: torch.Tensor) -> torch.Tensor:
        """A buffer ``(b, len(slot.kv_heads), L, d)`` over all key/value heads; a head the slot does not keep
        gets some kept head's rows, which no query head of it sees (attend_parts masks them)."""
        return x if slot.kv_spread is None else x.index_select(1, slot.kv_spread)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (e.g. after dropping finished sequences or for beam search)."""
        self._keys = [k.index_select(0, index) for k in self._keys]
        self._values = [v.index_select(0, index) for v in self._values]
        self.batch_size = int(index.numel())


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
