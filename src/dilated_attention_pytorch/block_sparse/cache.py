"""A bounded, thread-safe LRU for layout-derived metadata, keyed by everything the metadata depends on."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Optional, TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["CacheStats", "LRUCache", "layout_digest", "tensor_bytes", "METADATA_CACHE"]

T = TypeVar("T")


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    size: int
    maxsize: int
    nbytes: int  # bytes of the entries that declared their size
    max_bytes: Optional[int]


class LRUCache(Generic[T]):
    """At most ``maxsize`` entries and, when ``max_bytes`` is set, at most that many bytes of declared
    entry sizes (the newest entry always stays); the least recently used entry is evicted first.

    ``get_or_create(key, make, nbytes)`` runs ``make()`` outside the lock on a miss (two threads missing
    the same key at once may both build it; the first stored value wins and both get that one).
    """

    def __init__(self, maxsize: int = 64, max_bytes: Optional[int] = None) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be an int >= 1, but got {maxsize!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_bytes must be None or an int >= 1, but got {max_bytes!r}")
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._data: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def get_or_create(self, key: Hashable, make: Callable[[], T], nbytes: Optional[Callable[[T], int]] = None) -> T:
        with self._lock:
            if key in self._data:
                self._hits += 1
                self._data.move_to_end(key)
                return self._data[key][0]
            self._misses += 1
        value = make()
        size = int(nbytes(value)) if nbytes is not None else 0
        with self._lock:
            if key in self._data:  # another thread stored it meanwhile
                self._data.move_to_end(key)
                return self._data[key][0]
            self._data[key] = (value, size)
            self._bytes += size
            while len(self._data) > self.maxsize or (
                self.max_bytes is not None and self._bytes > self.max_bytes and len(self._data) > 1
            ):
                _, (_, evicted) = self._data.popitem(last=False)
                self._bytes -= evicted
            return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._data), self.maxsize, self._bytes, self.max_bytes)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0
            self._hits = 0
            self._misses = 0


def tensor_bytes(obj: object) -> int:
    """Bytes of the tensors in ``obj``: a tensor, or (nested) tuples/lists/dicts/dataclass-like objects."""
    seen: set[int] = set()

    def walk(x: object, depth: int) -> int:
        if isinstance(x, torch.Tensor):
            if id(x) in seen:
                return 0
            seen.add(id(x))
            return x.nelement() * x.element_size()
        if depth > 3:
            return 0
        if isinstance(x, (tuple, list)):
            return sum(walk(y, depth + 1) for y in x)
        if isinstance(x, dict):
            return sum(walk(y, depth + 1) for y in x.values())
        if hasattr(x, "__dict__"):
            return sum(walk(y, depth + 1) for y in vars(x).values())
        if hasattr(x, "__slots__"):
            return sum(walk(getattr(x, name, None), depth + 1) for name in x.__slots__)
        return 0

    return walk(obj, 0)


def _content_digest(layout: torch.Tensor) -> str:
    flat = layout.contiguous().view(torch.uint8).reshape(-1)  # bool -> uint8 without a copy
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    packed = (flat.view(-1, 8) * weights).sum(-1, dtype=torch.uint8)  # (numel/8,) one byte per 8 entries
    digest = hashlib.blake2b(packed.cpu().numpy(), digest_size=16)
    digest.update(repr(tuple(layout.shape)).encode())
    return digest.hexdigest()


_DIGESTS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # layout tensor -> (its state, digest)
_DIGESTS_LOCK = threading.Lock()


def layout_digest(layout: torch.Tensor) -> str:
    """Content hash of a bool layout: its bits packed on its own device, then BLAKE2b on the host.

    Hashing copies the packed bits to the host (8 MB for 16 heads at 256K tokens, block 128; its time:
    BENCHMARKS.md), so the digest of a layout tensor is kept while the tensor lives and is unchanged: same
    version counter (PyTorch bumps it on every in-place write, through views too), storage, offset,
    shape and strides. Writes that bypass PyTorch's version counter (through ``.data``, DLPack or a
    NumPy view) are not seen: make a new tensor instead.
    """
    state = (layout._version, layout.untyped_storage().data_ptr(), layout.storage_offset(), tuple(layout.shape),
             layout.stride())
    with _DIGESTS_LOCK:
        held = _DIGESTS.get(layout)
    if held is not None and held[0] == state:
        return held[1]
    digest = _content_digest(layout)
    with _DIGESTS_LOCK:
        _DIGESTS[layout] = (state, digest)
    return digest


# Metadata of every path (index plans, FlexAttention block masks, exchange plans, built layouts). Keys
# always include the device. A FlexAttention block mask at 256K tokens, 16 heads, block 128 holds ~1 GB
# of block indices, hence the byte bound.
METADATA_CACHE: LRUCache = LRUCache(maxsize=64, max_bytes=4 << 30)
