"""Block-sparse attention with one joint softmax: layouts, functional, modules, distributed, factory."""

from __future__ import annotations

from .cache import METADATA_CACHE, CacheStats, LRUCache, layout_digest
from .config import PATTERNS, SparsePatternConfig
from .functional import block_sparse_attention, block_sparse_backend
from .layouts import (
    adaptive_layout,
    dilated_layout,
    global_local_layout,
    hierarchical_layout,
    layout_density,
    layout_from_mask_mod,
    local_window_layout,
    random_layout,
    strided_layout,
)
from .modules import BlockSparseRingDilatedAttention, BlockSparseRingMultiheadDilatedAttention
from ..factory import create_block_sparse_attention
from ..parallel.block_sparse import BlockSparseRingDistributedDilatedAttention  # sequence-sharded: under parallel/

__all__ = [
    "METADATA_CACHE",
    "PATTERNS",
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingDistributedDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttention",
    "CacheStats",
    "LRUCache",
    "SparsePatternConfig",
    "adaptive_layout",
    "block_sparse_attention",
    "block_sparse_backend",
    "create_block_sparse_attention",
    "dilated_layout",
    "global_local_layout",
    "hierarchical_layout",
    "layout_density",
    "layout_digest",
    "layout_from_mask_mod",
    "local_window_layout",
    "random_layout",
    "strided_layout",
]
