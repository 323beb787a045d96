"""``BaseDilatedAttention`` and ``DilatedAttention``: modules over :func:`dilated_attention`."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .config import DilatedAttentionConfig
from .functional import dilated_attention

__all__ = ["BaseDilatedAttention", "DilatedAttention"]


class BaseDilatedAttention(nn.Module):
    """Holds a validated :class:`DilatedAttentionConfig`; subclasses choose how attention runs.

    Input ``query (b, n, h, d)``, ``key``/``value (b, n, h_kv, d)``; output ``(b, n, h, d)``.
    Dropout applies in training mode only. ``cu_seqlens``/``max_seqlen`` (packed documents, inputs
    ``(total, h, d)``) and ``sequence_starts`` (left padding) as in :func:`dilated_attention`; on one
    device only (subclasses that run attention another way, e.g. over ranks, reject them).
    """

    config: DilatedAttentionConfig
    default_backend = "auto"

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        softmax_scale: Optional[float] = None,
        attention_dropout: float = 0.0,
        *,
        offsets: Union[str, Sequence[Sequence[int]]] = "paper",
        head_groups: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        backend = self.default_backend if backend is None else backend
        self.config = DilatedAttentionConfig(
            segment_lengths, dilation_rates, softmax_scale, attention_dropout, offsets, head_groups, backend
        )

    @property
    def segment_lengths(self) -> tuple[int, ...]:
        return tuple(self.config.segment_lengths)

    @property
    def dilation_rates(self) -> tuple[int, ...]:
        return tuple(self.config.dilation_rates)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"segment_lengths={list(c.segment_lengths)}, dilation_rates={list(c.dilation_rates)}, "
            f"offsets={c.offsets!r}, head_groups={c.head_groups}, dropout={c.dropout}, backend={c.backend!r}"
        )

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False,
                key_padding_mask: Optional[torch.Tensor] = None, *, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, sequence_starts=None) -> torch.Tensor:
        varlen = {name: x for name, x in (("cu_seqlens", cu_seqlens), ("max_seqlen", max_seqlen),
                                          ("sequence_starts", sequence_starts)) if x is not None}
        if not varlen:
            return self._attend(query, key, value, is_causal, key_padding_mask)
        if type(self)._attend is not BaseDilatedAttention._attend:
            raise ValueError(
                f"{type(self).__name__} does not support variable-length inputs ({', '.join(varlen)}): it splits "
                "one sequence per batch row (over ranks or blocks); run packed documents or left-padded rows with "
                "DilatedAttention or ImprovedDilatedAttention on one device"
            )
        return self._attend(query, key, value, is_causal, key_padding_mask, **varlen)

    def _attend(self, query, key, value, is_causal, key_padding_mask, **varlen) -> torch.Tensor:
        """How this module runs attention (what subclasses change; ``varlen`` only reaches this one)."""
        c = self.config
        return dilated_attention(
            query, key, value, c.segment_lengths, c.dilation_rates, is_causal=is_causal, scale=c.softmax_scale,
            dropout_p=c.dropout if self.training else 0.0, offsets=c.offsets, head_groups=c.head_groups,
            key_padding_mask=key_padding_mask, backend=c.backend, **varlen,
        )


class DilatedAttention(BaseDilatedAttention):
    """LongNet dilated attention (README, "What it computes") on the portable path (PyTorch's fused kernels
    per block)."""

    default_backend = "portable"
