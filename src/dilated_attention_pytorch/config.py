"""``DilatedAttentionConfig``: the validated settings every dilated-attention module shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from . import _validation as V
from .backends import BACKENDS

__all__ = ["DilatedAttentionConfig"]


@dataclass(frozen=True)
class DilatedAttentionConfig:
    """Patterns and attention settings, checked once at construction.

    ``offsets`` is a rule name or explicit ``offsets[i][j]``; explicit lists are checked against the
    number of heads when the heads are known (at the first forward or in a multihead module).
    """

    segment_lengths: Sequence[int]
    dilation_rates: Sequence[int]
    softmax_scale: Optional[float] = None
    dropout: float = 0.0
    offsets: Union[str, Sequence[Sequence[int]]] = "paper"
    head_groups: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        ws, rs = V.check_patterns(self.segment_lengths, self.dilation_rates)
        object.__setattr__(self, "segment_lengths", ws)
        object.__setattr__(self, "dilation_rates", rs)
        object.__setattr__(self, "softmax_scale", V.check_scale("softmax_scale", self.softmax_scale))
        object.__setattr__(self, "dropout", V.check_dropout("dropout", self.dropout))
        object.__setattr__(self, "head_groups", V.check_bool("head_groups", self.head_groups))
        object.__setattr__(self, "offsets", V.check_offsets(self.offsets, rs, None, self.head_groups))
        object.__setattr__(self, "backend", V.check_choice("backend", self.backend, BACKENDS))

    @property
    def num_patterns(self) -> int:
        return len(self.segment_lengths)
