"""A bounded, thread-safe LRU cache with hit/miss counters: every cache of the package is one of these
(or ``functools.lru_cache``)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Optional, TypeVar

__all__ = ["CacheStats", "LRUCache", "cached"]

T = TypeVar("T")


def cached(fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` for an ``functools.lru_cache``-wrapped ``fn``, past the cache inside ``torch.compile``
    (Dynamo traces the plain function; a traced cache lookup would warn)."""
    import torch

    return fn.__wrapped__(*args) if torch.compiler.is_compiling() else fn(*args)


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
