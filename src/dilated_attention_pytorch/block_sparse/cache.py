"""A bounded, thread-safe LRU for layout-derived metadata, keyed by everything the metadata depends on."""

from __future__ import annotations

import hashlib
import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..lru import CacheStats, LRUCache  # the package's one LRU, re-exported here

__all__ = ["CacheStats", "LRUCache", "layout_digest", "tensor_bytes", "METADATA_CACHE"]


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
