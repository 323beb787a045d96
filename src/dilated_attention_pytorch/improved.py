"""``ImprovedDilatedAttention`` and ``ImprovedMultiheadDilatedAttention``: the fastest single-device path.

They run the fused backend (cuDNN attention on strided dilated views, chunked fp32 merge) wherever it
supports the inputs and the portable path elsewhere; :meth:`ImprovedDilatedAttention.explain` says
which runs and why. The multihead form fuses the q/k/v projections into one matrix product and
converts losslessly to and from :class:`MultiheadDilatedAttention`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import BaseDilatedAttention
from .backends import BackendChoice, explain_backend
from .multihead import BaseMultiheadDilatedAttention, MultiheadDilatedAttention

__all__ = ["ImprovedDilatedAttention", "ImprovedMultiheadDilatedAttention"]


class ImprovedDilatedAttention(BaseDilatedAttention):
    """Dilated attention on the fused GPU path where it applies (``backend="auto"``)."""

    default_backend = "auto"

    def explain(self, query: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> BackendChoice:
        """The backend a forward on ``query`` runs, with the fused kernels' reasons when it is not fused."""
        dropout = self.config.dropout if self.training else 0.0
        return explain_backend(query, key_padding_mask=key_padding_mask, dropout_p=dropout, backend=self.config.backend)


class ImprovedMultiheadDilatedAttention(BaseMultiheadDilatedAttention):
    """Multi-head dilated attention with one fused q/k/v projection (``qkv_proj``)."""

    attention_class = ImprovedDilatedAttention
    _layout_hint = ("qkv_proj.weight", "q_proj.weight",
                    "has separate q_proj/k_proj/v_proj weights (a MultiheadDilatedAttention's); this module fuses them "
                    "into qkv_proj: load it into a MultiheadDilatedAttention m and convert with "
                    "ImprovedMultiheadDilatedAttention.from_multihead(m)")

    def _make_projections(self, bias: bool, factory: dict) -> None:
        kv_dim = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(self.embed_dim, self.embed_dim + 2 * kv_dim, bias=bias, **factory)

    def _split(self) -> list[int]:
        kv_dim = self.num_kv_heads * self.head_dim
        return [self.embed_dim, kv_dim, kv_dim]

    def _qkv(self) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(weight, bias) of the q, k and v blocks of the fused projection (views)."""
        bias = self.qkv_proj.bias
        biases = (None,) * 3 if bias is None else bias.split(self._split())
        return list(zip(self.qkv_proj.weight.split(self._split()), biases))

    def _project(self, query, key, value):
        if query is key and key is value:  # self-attention: one matrix product
            return self.qkv_proj(query).split(self._split(), dim=-1)
        return tuple(nn.functional.linear(x, w, b) for x, (w, b) in zip((query, key, value), self._qkv()))


    # -- lossless conversion -----------------------------------------------------------------------
    def _settings(self) -> dict:
        c = self.attention.config
        p = self.out_proj.weight
        return dict(
            embed_dim=self.embed_dim, num_heads=self.num_heads, segment_lengths=c.segment_lengths,
            dilation_rates=c.dilation_rates, dropout=c.dropout, bias=self.out_proj.bias is not None,
            layer_norm=self.norm is not None, layer_norm_eps=self.norm.eps if self.norm is not None else 1e-5,
            gamma_init=self.gamma_init, num_kv_heads=self.num_kv_heads, softmax_scale=c.softmax_scale,
            offsets=c.offsets, head_groups=c.head_groups, device=p.device, dtype=p.dtype, batch_first=self.batch_first,
        )

    @classmethod
    def from_multihead(cls, m: MultiheadDilatedAttention) -> "ImprovedMultiheadDilatedAttention":
        """The same module with fused projections; outputs are equal."""
        if not isinstance(m, MultiheadDilatedAttention):
            raise TypeError(f"from_multihead expects a MultiheadDilatedAttention, but got {type(m).__name__}")
        new = cls(**ImprovedMultiheadDilatedAttention._settings(m))
        state = {k: v for k, v in m.state_dict().items() if not k.startswith(("q_proj", "k_proj", "v_proj"))}
        state["qkv_proj.weight"] = torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight])
        if m.q_proj.bias is not None:
            state["qkv_proj.bias"] = torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias])
        new.load_state_dict(state)
        new.train(m.training)
        return new

    def to_multihead(self) -> MultiheadDilatedAttention:
        """The same module with separate q/k/v projections; outputs are equal."""
        new = MultiheadDilatedAttention(**self._settings(), backend=self.attention.config.backend)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("qkv_proj")}
        for name, w in zip(("q_proj", "k_proj", "v_proj"), self.qkv_proj.weight.split(self._split())):
            state[f"{name}.weight"] = w
        if self.qkv_proj.bias is not None:
            for name, b in zip(("q_proj", "k_proj", "v_proj"), self.qkv_proj.bias.split(self._split())):
                state[f"{name}.bias"] = b
        new.load_state_dict(state)
        new.train(self.training)
        return new
