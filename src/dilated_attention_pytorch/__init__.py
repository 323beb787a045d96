"""Exact LongNet dilated attention for PyTorch."""

from __future__ import annotations

from .attention import BaseDilatedAttention, DilatedAttention
from .backends import BackendChoice, explain_backend
from .block_sparse import (
    BlockSparseRingDilatedAttention,
    BlockSparseRingDistributedDilatedAttention,
    BlockSparseRingMultiheadDilatedAttention,
    SparsePatternConfig,
    block_sparse_attention,
)
from .config import DilatedAttentionConfig
from .functional import dilated_attention
from .improved import ImprovedDilatedAttention, ImprovedMultiheadDilatedAttention
from .multihead import BaseMultiheadDilatedAttention, MultiheadDilatedAttention
from .parallel import (
    CommStats,
    DistributedImprovedDilatedAttention,
    DistributedImprovedMultiheadDilatedAttention,
    RingDilatedAttention,
    RingMultiheadDilatedAttention,
    head_parallel_dilated_attention,
    ring_dilated_attention,
)

__all__ = [
    "BackendChoice",
    "BaseDilatedAttention",
    "BaseMultiheadDilatedAttention",
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingDistributedDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttention",
    "CommStats",
    "DilatedAttention",
    "DilatedAttentionConfig",
    "DistributedImprovedDilatedAttention",
    "DistributedImprovedMultiheadDilatedAttention",
    "ImprovedDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "MultiheadDilatedAttention",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "SparsePatternConfig",
    "block_sparse_attention",
    "dilated_attention",
    "explain_backend",
    "head_parallel_dilated_attention",
    "ring_dilated_attention",
]

__version__ = "0.1.0"
