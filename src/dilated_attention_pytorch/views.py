"""Views: how a task of the executor reads its rows of a tensor and writes results back.

Every view has ``read(x) -> (B, H, L, F)`` (the kernel layout: batch of problems, heads, rows, features)
and ``write(target, src)`` / ``add(target, src, write=False)`` back to ``x``'s layout. Three kinds:

- :class:`Rows`: the rows of a :class:`~.planning.Block` of a ``(b, n, heads, F)`` tensor — a strided
  view, no gather copy (a head list that is not an arithmetic progression is an ``index_select``). Chains
  of view ops are remembered per shape and stride (:class:`ViewMemo`), so later calls make each view
  with one ``as_strided``.
- :class:`Whole`: a tensor already in the kernel layout (rows received from other ranks, laid out per
  kernel call on arrival).
- :class:`Tiles`: ``(head, block)`` tiles of a blocked ``(b, H, blocks, block_size, F)`` tensor (block-sparse).

Row-wise tensors (LSEs, masks) are read with a trailing feature dimension of 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import torch

from .lru import LRUCache
from .planning import Block, HeadIndex, index_key

__all__ = ["Rows", "Tiles", "ViewMemo", "from_kernel", "rows", "to_kernel", "Whole"]


class ViewMemo:
    """What a chain of view ops does to tensors of one shape and stride, remembered so that later calls
    make the same view with one ``as_strided``.

    At short sequences the chains (narrow, unflatten, slice, diagonal, transpose: about ten ops per
    tensor and block) cost more host time than the kernels they feed. A chain whose result is a copy
    (an ``index_select``, a ``contiguous``) is remembered as such and runs every time. A bounded,
    thread-safe LRU (:class:`~dilated_attention_pytorch.lru.LRUCache`); entries are a few integers.
    """

    def __init__(self, maxsize: int = 1 << 14) -> None:
        self._specs: LRUCache = LRUCache(maxsize)

    def __call__(self, x: torch.Tensor, key: tuple, build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced once into the graph: nothing to save
            return build(x)
        built: list[torch.Tensor] = []

        def make() -> Optional[tuple]:
            y = build(x)
            built.append(y)
            if y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() or y.numel() == 0:
                return None  # a copy: nothing to remember but that
            return y.shape, y.stride(), y.storage_offset() - x.storage_offset()

        spec = self._specs.get_or_create((key, x.shape, x.stride()), make)
        if built:
            return built[0]
        if spec is None:
            return build(x)
        return x.as_strided(spec[0], spec[1], x.storage_offset() + spec[2])


_memo = ViewMemo()


@lru_cache(maxsize=1024)
def _index_tensor(index: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Head indices on the device, made once (a host-to-device copy would stall the queue)."""
    return torch.tensor(index, device=device)


def index_tensor(index: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.tensor(index, device=device)
    return _index_tensor(index, device)


def rows(x: torch.Tensor, block: Block) -> torch.Tensor:
    """View (b, count, rows, ...) of the block's rows of ``x (b, n, ...)``; no copy."""
    span = block.span
    seg = x.narrow(1, span.start, span.count * span.segment).unflatten(1, (span.count, span.segment))
    return seg[:, :, block.offset :: block.dilation]


def _heads(x: torch.Tensor, index: HeadIndex) -> torch.Tensor:
    """Select heads (dim 3) of a (b, count, rows, H, ...) tensor: a view for a slice, else a copy."""
    if isinstance(index, slice):
        return x[:, :, :, index]
    return x.index_select(3, index_tensor(index, x.device))


def _view(x: torch.Tensor, block: Block, heads: HeadIndex) -> torch.Tensor:
    """(b, count, rows, H', ...) view or copy of the block's rows and heads of ``x (b, n, h, ...)``."""
    if block.diag_m is None:
        return _heads(rows(x, block), heads)
    span, r, h = block.span, block.dilation, x.shape[2]
    seg = x.narrow(1, span.start, span.count * span.segment).unflatten(1, (span.count, span.rows, r))
    if h < r:  # every head j has offset j: offsets 0..h-1 against all h heads
        seg = seg.narrow(3, 0, h)  # (b, count, rows, h_o, h, ...)
    else:
        seg = seg.unflatten(4, (h // r, r)).select(4, block.diag_m)  # (b, count, rows, r_o, r_h, ...)
    return seg.diagonal(dim1=3, dim2=4).movedim(-1, 3)  # (b, count, rows, heads, ...): head o has offset o


def to_kernel(x5: torch.Tensor) -> torch.Tensor:
    """(b, count, rows, H, D) -> (b*count, H, rows, D), a view where the strides allow."""
    b, s, c, h, d = x5.shape
    x = x5.reshape(b * s, c, h, d).transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()  # fused kernels need unit stride in head_dim


def from_kernel(x: torch.Tensor, b: int) -> torch.Tensor:
    """(b*count, H, rows, ...) -> (b, count, rows, H, ...)."""
    x = x.transpose(1, 2)
    return x.reshape(b, x.shape[0] // b, *x.shape[1:])


@dataclass(frozen=True)
class Rows:
    """The rows of ``block`` and heads ``heads`` (its query or its key/value heads) of a (b, n, h, F)
    tensor; ``piece = (c0, c1, h0, h1)`` narrows to segments ``[c0, c1)`` and heads ``[h0, h1)``."""

    block: Block
    heads: HeadIndex
    piece: Optional[tuple[int, int, int, int]] = None

    def _key(self, kind: str) -> tuple:
        return (kind, self.block.key, index_key(self.heads), self.piece)

    def _narrow(self, x: torch.Tensor) -> torch.Tensor:
        v = _view(x, self.block, self.heads)
        if self.piece is None:
            return v
        c0, c1, h0, h1 = self.piece
        return v[:, c0:c1, :, h0:h1]

    def read(self, x: torch.Tensor) -> torch.Tensor:
        return _memo(x, self._key("read"), lambda t: to_kernel(self._narrow(t)))

    def mask(self, key_valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Valid keys (B, L) of the block's rows, from ``key_valid (b, n)``."""
        if key_valid is None:
            return None
        r = rows(key_valid, self.block)
        if self.piece is not None:
            r = r[:, self.piece[0]:self.piece[1]]
        return r.reshape(-1, self.block.span.rows)

    def write(self, target: torch.Tensor, src: torch.Tensor) -> None:
        self.add(target, src, write=True)

    def add(self, target: torch.Tensor, src: torch.Tensor, write: bool = False) -> None:
        """The rows and heads of ``target`` += ``src`` (kernel layout; ``write``: =)."""
        src = from_kernel(src, target.shape[0])
        if self.block.diag_m is not None or isinstance(self.heads, slice):
            view = _memo(target, self._key("add"), self._narrow)
            view.copy_(src) if write else view.add_(src)
            return
        index = self.heads if self.piece is None else self.heads[self.piece[2]:self.piece[3]]
        r = rows(target, self.block)
        if self.piece is not None:
            r = r[:, self.piece[0]:self.piece[1]]
        idx = index_tensor(index, target.device)
        r.index_copy_(3, idx, src.to(target.dtype)) if write else r.index_add_(3, idx, src.to(target.dtype))


class Whole:
    """All of a tensor that is already in the kernel layout ``(B, H, L, F)``, its key mask ``(B, L)``."""

    def read(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def mask(self, key_valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return key_valid

    def add(self, target: torch.Tensor, src: torch.Tensor, write: bool = False) -> None:
        target.copy_(src) if write else target.add_(src)


@dataclass(frozen=True, eq=False)
class Tiles:
    """Tiles ``(heads[i], blocks[i])`` of a blocked ``(b, H, num_blocks, block_size, F)`` tensor, each at
    most once; ``key_len < block_size``: only the first ``key_len`` rows of each tile are valid keys."""

    heads: torch.Tensor  # (R,) long
    blocks: torch.Tensor  # (R,) long
    key_len: int
    block_size: int
    batch: int

    def read(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.heads, self.blocks]

    def mask(self, key_valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.key_len == self.block_size:
            return None
        return (torch.arange(self.block_size, device=self.heads.device) < self.key_len).expand(self.batch, self.block_size)

    def write(self, target: torch.Tensor, src: torch.Tensor) -> None:
        target[:, self.heads, self.blocks] = src.to(target.dtype)

    def add(self, target: torch.Tensor, src: torch.Tensor, write: bool = False) -> None:
        if write:
            self.write(target, src)
            return
        b, h, nb = target.shape[:3]
        target.view(b, h * nb, *target.shape[3:]).index_add_(1, self.heads * nb + self.blocks, src.to(target.dtype))
