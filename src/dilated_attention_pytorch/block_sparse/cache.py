"""A bounded, thread-safe LRU for layout-derived metadata, keyed by everything the metadata depends on."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

import torch

__all__ = ["CacheStats", "LRUCache", "layout_digest", "METADATA_CACHE"]

T = TypeVar("T")


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    size: int
    maxsize: int


class LRUCache(Generic[T]):
    """At most ``maxsize`` entries; the least recently used one is evicted first.

    ``get_or_create(key, make)`` runs ``make()`` outside the lock on a miss (two threads missing the same
    key at once may both build it; the first stored value wins and both get that one).
    """

    def __init__(self, maxsize: int = 64) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be an int >= 1, but got {maxsize!r}")
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, T] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def get_or_create(self, key: Hashable, make: Callable[[], T]) -> T:
        with self._lock:
            if key in self._data:
                self._hits += 1
                self._data.move_to_end(key)
                return self._data[key]
            self._misses += 1
        value = make()
        with self._lock:
            if key in self._data:  # another thread stored it meanwhile
                self._data.move_to_end(key)
                return self._data[key]
            self._data[key] = value
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
            return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._data), self.maxsize)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._hits = 0
            self._misses = 0


def layout_digest(layout: torch.Tensor) -> str:
    """Content hash of a bool layout: its bits packed on its own device, then BLAKE2b on the host."""
    flat = layout.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    packed = (flat.view(-1, 8) * weights).sum(-1, dtype=torch.uint8)  # (numel/8,) one byte per 8 entries
    digest = hashlib.blake2b(packed.cpu().numpy().tobytes(), digest_size=16)
    digest.update(repr(tuple(layout.shape)).encode())
    return digest.hexdigest()


# Metadata of every path (index plans, FlexAttention block masks). Keys always include the device.
METADATA_CACHE: LRUCache = LRUCache(maxsize=64)
