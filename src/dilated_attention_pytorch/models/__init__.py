"""LongNet models: ``LongNet`` (encoder-decoder), ``LongNetLM`` (decoder-only) and exact incremental decoding."""

from __future__ import annotations

from .config import LongNetConfig, LongNetLMConfig
from .decoding import DecodingState, DilatedKVCache
from .layers import magneto_gamma
from .lm import LongNetLM
from .longnet import LongNet
from .positions import RotaryEmbedding
from .static_decoding import StaticDilatedKVCache

__all__ = [
    "DecodingState",
    "DilatedKVCache",
    "LongNet",
    "LongNetConfig",
    "LongNetLM",
    "LongNetLMConfig",
    "RotaryEmbedding",
    "StaticDilatedKVCache",
    "magneto_gamma",
]
