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

__all__ = [
    "BackendChoice",
    "BaseDilatedAttention",
    "BaseMultiheadDilatedAttention",
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingDistributedDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttention",
    "DilatedAttention",
    "DilatedAttentionConfig",
    "ImprovedDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "MultiheadDilatedAttention",
    "SparsePatternConfig",
    "block_sparse_attention",
    "dilated_attention",
    "explain_backend",
]

__version__ = "0.1.0"
