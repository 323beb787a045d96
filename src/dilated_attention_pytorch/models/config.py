"""Configs of the LongNet models: plain dataclasses, validated on construction, saved in checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from .. import _validation as V
from ..factory import ATTENTION_TYPES
from .positions import POSITION_KINDS

__all__ = ["LongNetConfig", "LongNetLMConfig"]


@dataclass(frozen=True)
class _ModelSettings:
    vocab_size: int = 256
    embed_dim: int = 256
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # grouped-query attention when < num_heads
    ffn_dim: Optional[int] = None  # default 4 * embed_dim
    segment_lengths: Sequence[int] = (64, 128, 256)
    dilation_rates: Sequence[int] = (1, 2, 4)
    offsets: Union[str, Sequence[Sequence[int]]] = "paper"
    head_groups: bool = False
    positions: Optional[str] = "rotary"  # "rotary", "xpos" or None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    attention_type: str = "standard"
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed_dim", "num_heads"):
            V.check_int(name, getattr(self, name))
        kv = self.num_heads if self.num_kv_heads is None else V.check_int("num_kv_heads", self.num_kv_heads)
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % kv != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv})")
        if self.ffn_dim is not None:
            V.check_int("ffn_dim", self.ffn_dim)
        ws, rs = V.check_patterns(self.segment_lengths, self.dilation_rates)
        object.__setattr__(self, "segment_lengths", ws)
        object.__setattr__(self, "dilation_rates", rs)
        offsets = V.check_offsets(self.offsets, rs, self.num_heads, V.check_bool("head_groups", self.head_groups))
        object.__setattr__(self, "offsets", offsets)
        if self.positions is not None and self.positions not in POSITION_KINDS:
            raise ValueError(f"positions must be one of {POSITION_KINDS} or None, but got {self.positions!r}")
        if self.positions is not None and (self.embed_dim // self.num_heads) % 2 != 0:
            raise ValueError(
                f"positions={self.positions!r} needs an even head_dim, but got {self.embed_dim // self.num_heads}"
            )
        V.check_dropout("dropout", self.dropout)
        V.check_dropout("attention_dropout", self.attention_dropout)
        if self.attention_type not in ATTENTION_TYPES or self.attention_type in ("ring", "distributed"):
            raise ValueError(
                f"attention_type must be a single-device type ('auto', 'standard', 'improved', 'block_sparse'), "
                f"but got {self.attention_type!r}; sequence-parallel types take sequence shards, not whole sequences"
            )
        V.check_bool("tie_embeddings", self.tie_embeddings)
        eps = V.check_float("layer_norm_eps", self.layer_norm_eps, minimum=0.0, inclusive=False)
        object.__setattr__(self, "layer_norm_eps", eps)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_size(self) -> int:
        return 4 * self.embed_dim if self.ffn_dim is None else self.ffn_dim

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} got unknown field(s) {unknown}; accepted: {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class LongNetLMConfig(_ModelSettings):
    """Decoder-only LongNet language model."""

    num_layers: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        V.check_int("num_layers", self.num_layers)


@dataclass(frozen=True)
class LongNetConfig(_ModelSettings):
    """LongNet encoder-decoder (shared vocabulary and embeddings)."""

    encoder_layers: int = 4
    decoder_layers: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        V.check_int("encoder_layers", self.encoder_layers)
        V.check_int("decoder_layers", self.decoder_layers)
