"""A fixed-shape key/value cache for causal dilated attention: one token per step, capturable in a CUDA graph.

Slot (pattern ``i``: segment ``w``, dilation ``r``; offset ``o``) of :class:`~.decoding.DilatedKVCache` keeps
the keys of the current segment whose phase is ``o``. Row position ``t`` with ``t % w % r == o`` sees exactly
the positions ``u <= t`` of its segment with that phase; stored in order, the new key goes to index
``(t % w) // r`` and entries ``[0, (t % w) // r]`` are the segment's keys. Every token of a row is appended in
order (``fill`` writes the same layout), so no fill length or segment is kept: the state is a function of ``t``,
and ``t`` lives in a device tensor (one per row: left-padded rows have their own).

Storage: one "lane" per (slot, kept key/value head) of ``len(range(o, min(w, max_length), r))`` rows (the
indices a position below ``max_length`` can take), every lane in one flat key store and one value store
``(b, rows, d)`` allocated once. A step (:meth:`StaticDilatedKVCache.attend`) writes the new key/value into the
lanes of its phase and attends the lanes its heads read: on CUDA three Triton kernels (append, flash-decoding
partials, log-sum-exp merge) reading positions on the device, with no host sync, no data-dependent shape and no
Python branch on device values (a graph captures it); on the CPU torch ops on the same store (the append at
fixed shapes, the attention through :func:`~.decoding.attend_parts` over the active lanes, its shapes from the
host's copy of the positions). Both give the full causal pass's row, to rounding.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence, Union

import torch

from .. import _validation as V
from ..patterns import OffsetRule
from .decoding import _DecodeCache, attend_parts, check_decode_starts, spread_kv

__all__ = ["StaticDilatedKVCache"]

BACKENDS = ("auto", "triton", "torch")


class StaticDilatedKVCache(_DecodeCache):
    """:class:`~.decoding.DilatedKVCache` at fixed shapes for rows of at most ``max_length`` tokens (prompt plus
    generated, padding not counted): buffers allocated once, one token per :meth:`attend`, positions on the device.

    Capture: run :meth:`attend` once outside the graph on the Triton path (it compiles the kernels), then capture
    it (with the layer's projections) in a ``torch.cuda.CUDAGraph``; each replay advances the positions on the
    device. A replay runs no Python: call :meth:`replayed` after replays so that the host's counter (which checks
    ``max_length``) follows; while capturing, :meth:`attend` leaves that counter alone (nothing runs then).

    ``backend``: ``"triton"`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (not capturable: its
    shapes follow the positions) or ``"auto"`` (Triton on CUDA when triton is installed, else torch).
    ``block_k``: keys per tile of a Triton program (a power of two >= 16: the tiles are tensor-core dots);
    ``tiles``: tiles per program (a program's chunk of a lane is ``block_k * tiles`` keys).
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
        max_length: int,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        block_k: int = 64,
        tiles: int = 4,
    ) -> None:
        self._setup(segment_lengths, dilation_rates, offsets, head_groups, num_heads, num_kv_heads, head_dim, scale,
                    batch_size, device, dtype)
        self.max_length = V.check_int("max_length", max_length)
        if self.max_length >= 2**31:
            raise ValueError(f"max_length must be < 2**31 (positions are int32 in the kernels), but got {max_length}")
        block_k = V.check_int("block_k", block_k)
        if block_k & (block_k - 1) or block_k < 16:
            raise ValueError(f"block_k must be a power of two >= 16, but got {block_k}")
        self.tiles = V.check_int("tiles", tiles, minimum=1)
        self.block_k = block_k
        self.backend = _resolve_backend(V.check_choice("backend", backend, BACKENDS), self.device)
        self.starts: tuple[int, ...] = (0,) * batch_size  # per row the column of its first token
        self._build_lanes(len(segment_lengths))
        shape = (batch_size, self._rows, head_dim)
        self._keys = torch.zeros(shape, dtype=dtype, device=self.device)
        self._values = torch.zeros(shape, dtype=dtype, device=self.device)
        self._positions = torch.zeros(batch_size, dtype=torch.int64, device=self.device)  # next token's position
        self._partials: Optional[tuple[torch.Tensor, ...]] = None
        if self.backend == "triton" and self._num_lanes:
            from ..kernels._decode_kernel import chunks

            longest = max(cap for _, cap in self._slot_rows)
            parts = batch_size * num_heads * len(segment_lengths) * chunks(longest, block_k, self.tiles)
            self._partials = tuple(torch.empty(n, dtype=torch.float32, device=self.device)
                                   for n in (parts, parts, parts, parts * head_dim))

    def _build_lanes(self, num_patterns: int) -> None:
        """Lane table ``(lanes, 5)``: (w, r, o clamped to max_length, first row, key/value head); head table
        ``(patterns, h)``: the lane each query head reads through each pattern, -1 for none. A slot no position
        below max_length reaches gets no lane."""
        cap_len = self.max_length
        group = self.num_heads // self.num_kv_heads
        lanes, heads = [], [[-1] * self.num_heads for _ in range(num_patterns)]
        self._slot_rows: list[tuple[int, int]] = []  # per slot: (first row, rows per lane)
        rows = 0
        for slot in self._slots:
            cap = len(range(slot.offset, min(slot.segment, cap_len), slot.dilation))
            self._slot_rows.append((rows, cap))
            if cap == 0:
                continue
            first = len(lanes)
            for c in slot.kv_heads:
                lanes.append((min(slot.segment, cap_len), min(slot.dilation, cap_len), min(slot.offset, cap_len),
                              rows, c))
                rows += cap
            for j in slot.heads.nonzero().flatten().tolist():
                heads[slot.pattern][j] = first + slot.kv_heads.index(j // group)
        self._rows, self._num_lanes = rows, len(lanes)
        self._lane_tab = torch.tensor(lanes, dtype=torch.int32, device=self.device).view(len(lanes), 5)
        self._head_tab = torch.tensor(heads, dtype=torch.int32, device=self.device)
        self._lane_cols = self._lane_tab.long().unbind(1)  # for the torch path's append

    # -- size -------------------------------------------------------------------------------------
    def numel(self) -> int:
        """Elements of the key and value stores (fixed at construction)."""
        return self._keys.numel() + self._values.numel()

    # -- writing ----------------------------------------------------------------------------------
    def _lanes_of(self, store: torch.Tensor, idx: int) -> torch.Tensor:
        """Slot ``idx``'s lanes of ``store`` as ``(b, len(slot.kv_heads), rows per lane, d)`` (a view)."""
        first, cap = self._slot_rows[idx]
        kept = len(self._slots[idx].kv_heads)
        return store[:, first : first + kept * cap].view(self.batch_size, kept, cap, self.head_dim)

    def fill(self, key: torch.Tensor, value: torch.Tensor, sequence_starts=None) -> None:
        """Take the keys/values ``(b, n, h_kv, d)`` of a prompt's full causal pass: columns ``0..n-1``, or with
        ``sequence_starts`` (ints ``< n``, one per row) row ``i``'s columns ``start_i..n-1`` (left padding).
        Host work (not for capture)."""
        if self.position != 0:
            raise ValueError(f"fill() needs an empty cache, but the cache is at position {self.position}")
        self._check("key", key, self.num_kv_heads)
        self._check("value", value, self.num_kv_heads)
        n = key.shape[1]
        starts = (0,) * self.batch_size if sequence_starts is None else check_decode_starts(
            sequence_starts, self.batch_size, n)
        if n - min(starts) > self.max_length:
            raise ValueError(f"the prompt must fit max_length={self.max_length} tokens per row, but its longest row "
                             f"has {n - min(starts)}")
        for start in sorted(set(starts)):
            rows = torch.tensor([i for i, s in enumerate(starts) if s == start], device=self.device)
            m = n - start  # the rows' next position: the lanes hold the keys of its segment
            for idx, slot in enumerate(self._slots):
                if self._slot_rows[idx][1] == 0:
                    continue
                lo = start + min(m, m - m % slot.segment + slot.offset)  # clamped: segments may exceed int64
                for store, x in ((self._keys, key), (self._values, value)):
                    part = x[rows, lo:n:max(1, min(slot.dilation, n))]  # (rows, L, h_kv, d)
                    if slot.kv_index is not None:
                        part = part.index_select(2, slot.kv_index)
                    self._lanes_of(store, idx)[rows, :, : part.shape[1]] = part.transpose(1, 2).to(self.dtype)
        self._positions.copy_(torch.tensor([n - s for s in starts]))
        self.position, self.starts = n, starts

    # -- decoding ---------------------------------------------------------------------------------
    def replayed(self, steps: int = 1) -> None:
        """Count ``steps`` replays of a graph that captured :meth:`attend` (a replay runs no Python): moves the
        host's counter, and raises if the rows went past ``max_length``."""
        self._advance(V.check_int("steps", steps, minimum=0))

    def _advance(self, steps: int) -> None:
        longest = self.position + steps - min(self.starts)
        if longest > self.max_length:
            raise ValueError(f"decoding past max_length={self.max_length}: the longest row would hold {longest} "
                             f"tokens; build the cache with a larger max_length")
        self.position += steps

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The next token of every row: query ``(b, 1, h, d)``, key/value ``(b, 1, h_kv, d)`` -> ``(b, 1, h, d)``
        in the query's dtype. Appends the key/value, attends, advances the positions on the device."""
        self._check("query", query, self.num_heads)
        self._check("key", key, self.num_kv_heads)
        self._check("value", value, self.num_kv_heads)
        if not (query.shape[1] == key.shape[1] == value.shape[1] == 1):
            raise ValueError(f"attend() takes one token per row, but got query, key, value lengths "
                             f"{query.shape[1]}, {key.shape[1]}, {value.shape[1]}")
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing and self.backend != "triton":
            raise ValueError("the torch path reads positions on the host and cannot be captured; "
                             "build the cache with backend='triton'")
        column = self.position
        if not capturing:
            self._advance(1)
        q = query[:, 0].to(self.dtype)
        k, v = key[:, 0].to(self.dtype), value[:, 0].to(self.dtype)
        if not self._num_lanes:  # no position below max_length is seen by any head
            out = torch.zeros_like(q)
        elif self.backend == "triton":
            from ..kernels import _decode_kernel as K

            q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
            K.append(k, v, self._keys, self._values, self._positions, self._lane_tab)
            out = K.attend(q, self._keys, self._values, self._positions, self._lane_tab, self._head_tab,
                           self._partials, self.scale, self.block_k, self.num_kv_heads, self.tiles)
        else:
            self._append_torch(k, v)
            out = self._attend_torch(q, column)
        self._positions.add_(1)
        return out.to(query.dtype)[:, None]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search), in place: as many rows as before (the buffers are fixed)."""
        if index.dim() != 1 or index.numel() != self.batch_size:
            raise ValueError(f"index must hold batch_size={self.batch_size} rows (a fixed-shape cache keeps its "
                             f"batch), but got shape {tuple(index.shape)}")
        for x in (self._keys, self._values, self._positions):
            x.copy_(x.index_select(0, index))
        self.starts = tuple(self.starts[i] for i in index.tolist())

    def _append_torch(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fixed-shape append: every lane rewrites one row, the new key where the row's phase is the lane's,
        else the row it already holds."""
        w, r, o, first, kv = self._lane_cols
        within = self._positions[:, None] % w  # (b, lanes)
        active = within % r == o
        rows = (first + torch.where(active, within // r, 0))[..., None].expand(-1, -1, self.head_dim)
        for store, x in ((self._keys, k), (self._values, v)):
            new = torch.where(active[..., None], x.index_select(1, kv), store.gather(1, rows))  # (b, lanes, d)
            store.scatter_(1, rows, new)

    def _attend_torch(self, q: torch.Tensor, column: int) -> torch.Tensor:
        """One attention over the active lanes (:func:`attend_parts`); shapes from the host's positions."""
        ts = [column - s for s in self.starts]
        parts = []
        for idx, slot in enumerate(self._slots):
            if self._slot_rows[idx][1] == 0:
                continue
            lengths = [(t % slot.segment) // slot.dilation + 1 if t % slot.segment % slot.dilation == slot.offset
                       else 0 for t in ts]
            size = max(lengths)
            if size == 0:
                continue
            seen = None
            if min(lengths) < size:
                seen = torch.arange(size, device=self.device) < torch.tensor(lengths, device=self.device)[:, None]
            keys, values = (self._lanes_of(x, idx)[:, :, :size] for x in (self._keys, self._values))
            parts.append((slot, spread_kv(slot, keys), spread_kv(slot, values), seen))
        return attend_parts(self.scale, q, parts)


def _resolve_backend(backend: str, device: torch.device) -> str:
    has_triton = importlib.util.find_spec("triton") is not None
    if backend == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if backend == "triton":
        if not has_triton:
            raise ValueError("backend='triton' needs triton installed (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' runs on CUDA, or on device {device} only under TRITON_INTERPRET=1")
    return backend
