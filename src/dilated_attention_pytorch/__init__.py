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
from .factory import (
    create_block_sparse_attention,
    create_dilated_attention,
    create_multihead_dilated_attention,
    explain_auto,
)
from .functional import dilated_attention
from .improved import ImprovedDilatedAttention, ImprovedMultiheadDilatedAttention
from .models import LongNet, LongNetConfig, LongNetLM, LongNetLMConfig
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
    "LongNet",
    "LongNetConfig",
    "LongNetLM",
    "LongNetLMConfig",
    "MultiheadDilatedAttention",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "SparsePatternConfig",
    "block_sparse_attention",
    "create_block_sparse_attention",
    "create_dilated_attention",
    "create_multihead_dilated_attention",
    "dilated_attention",
    "explain_auto",
    "explain_backend",
    "head_parallel_dilated_attention",
    "ring_dilated_attention",
]

__version__ = "0.1.0"
