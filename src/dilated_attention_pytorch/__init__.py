"""Exact LongNet dilated attention for PyTorch."""

from __future__ import annotations

from .attention import BaseDilatedAttention, DilatedAttention
from .config import DilatedAttentionConfig
from .functional import dilated_attention
from .multihead import BaseMultiheadDilatedAttention, MultiheadDilatedAttention

__all__ = [
    "BaseDilatedAttention",
    "BaseMultiheadDilatedAttention",
    "DilatedAttention",
    "DilatedAttentionConfig",
    "MultiheadDilatedAttention",
    "dilated_attention",
]

__version__ = "0.1.0"
