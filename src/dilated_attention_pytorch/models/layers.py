"""MAGNETO building blocks of LongNet: dilated self-attention with positions and a decoding cache,
dense cross-attention, feed-forward, and the pre-LN residual block that holds them.

MAGNETO (Wang et al. 2022, "Foundation Transformers"): every sublayer is ``x + f(LN(x))`` and ``f``
has a second LayerNorm (sub-LN) right before its output projection; the value/output projections and
both feed-forward matrices are initialised with gain ``γ``, which depends on the depth
(:func:`magneto_gamma`), q/k projections with gain 1.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validation as V
from ..factory import create_dilated_attention, explain_auto
from ..multihead import BaseMultiheadDilatedAttention
from .decoding import DilatedKVCache, check_decode_starts
from .positions import RotaryEmbedding, document_positions
from .static_decoding import StaticDilatedKVCache

__all__ = ["CrossAttention", "DilatedSelfAttention", "FeedForward", "LongNetBlock", "magneto_gamma"]

DECODABLE_TYPES = ("standard", "improved")  # the attention types whose full pass is dilated_attention itself


def magneto_gamma(role: str, *, encoder_layers: int = 0, decoder_layers: int = 0) -> float:
    """MAGNETO's init gain: decoder-only ``sqrt(log 2N)``; encoder-decoder encoder
    ``sqrt(log(3N_d)·log(2N_e)/3)`` and decoder ``sqrt(log 3N_d)``; encoder-only ``sqrt(log 2N)``."""
    if role == "decoder_only":
        return math.sqrt(math.log(2 * decoder_layers))
    if role == "encoder_only":
        return math.sqrt(math.log(2 * encoder_layers))
    if role == "encoder":
        return math.sqrt(math.log(3 * decoder_layers) * math.log(2 * encoder_layers) / 3)
    if role == "decoder":
        return math.sqrt(math.log(3 * decoder_layers))
    raise ValueError(f"role must be 'decoder_only', 'encoder_only', 'encoder' or 'decoder', but got {role!r}")


class DilatedSelfAttention(BaseMultiheadDilatedAttention):
    """Multi-head dilated self-attention with rotary/XPOS positions and an optional :class:`DilatedKVCache`.

    The attention core comes from the factory (``attention_type``), so a model can run on any
    single-device implementation with the standard constructor.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, positions: Optional[str] = "rotary",
                 attention_type: str = "standard", **kwargs) -> None:
        """Arguments of :class:`BaseMultiheadDilatedAttention`; the core is built by
        :func:`~dilated_attention_pytorch.factory.create_dilated_attention` for ``attention_type``."""
        kind = attention_type
        if kind == "auto":  # whole sequences: never a sequence-parallel type
            kind = explain_auto(single_device=True).attention_type
        super().__init__(embed_dim, num_heads, attention=functools.partial(create_dilated_attention, kind), **kwargs)
        if not self.batch_first:
            raise ValueError("DilatedSelfAttention takes x of shape (batch, seq, embed_dim): batch_first must be True")
        self.attention_type = kind
        self.rotary = None if positions is None else RotaryEmbedding(self.head_dim, kind=positions)

    def new_cache(self, batch_size: int, device=None, dtype=torch.float32, *,
                  max_length: Optional[int] = None) -> Union[DilatedKVCache, StaticDilatedKVCache]:
        """A decoding cache; with ``max_length`` (tokens per row, prompt included) the fixed-shape
        :class:`StaticDilatedKVCache` (one token per step after the prompt, capturable in a CUDA graph)."""
        if self.attention_type not in DECODABLE_TYPES:
            raise ValueError(
                f"incremental decoding computes dilated attention (types {DECODABLE_TYPES}); this layer uses "
                f"attention_type={self.attention_type!r}, whose full pass is another function"
            )
        c = self.attention.config
        kwargs = dict(
            segment_lengths=c.segment_lengths, dilation_rates=c.dilation_rates, offsets=c.offsets,
            head_groups=c.head_groups, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, scale=c.softmax_scale, batch_size=batch_size, device=device, dtype=dtype,
        )
        if max_length is None:
            return DilatedKVCache(**kwargs)
        return StaticDilatedKVCache(max_length=max_length, **kwargs)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        *,
        is_causal: bool = True,
        key_padding_mask: Optional[torch.Tensor] = None,
        cache: Optional[DilatedKVCache] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        sequence_starts=None,
    ) -> torch.Tensor:
        """x ``(b, n, embed_dim)`` -> ``(b, n, embed_dim)``. With ``cache``: causal, continues at ``cache.position``.
        ``cu_seqlens``: packed documents over the ``b * n`` flattened tokens (positions restart per document).
        ``sequence_starts`` (left padding, see :func:`~dilated_attention_pytorch.dilated_attention`): row ``i``
        is the sequence from column ``start_i`` (positions and segments count from it; the padding before it
        is never read); with a cache only for the prompt (the cache keeps the starts for later tokens)."""
        if cu_seqlens is not None:
            if sequence_starts is not None:
                raise ValueError("pass cu_seqlens (packed documents) or sequence_starts (left padding), not both")
            return self._packed(x, is_causal, key_padding_mask, cache, cu_seqlens)
        self._check_inputs(("x", x))
        b, n, _ = x.shape
        q, k, v = self._project(x, x, x)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))  # (b, n, h, d)
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))  # (b, n, h_kv, d)
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        start = 0 if cache is None else cache.position
        starts = self._starts(sequence_starts, cache, b, n)
        if self.rotary is not None:
            q, k = self._rotate(q, k, start, starts)
        varlen = {} if sequence_starts is None else {"sequence_starts": starts}
        if cache is None:
            out = self.attention(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, **varlen)
        else:
            if not is_causal or key_padding_mask is not None:
                raise ValueError("a decoding cache needs is_causal=True and key_padding_mask=None")
            if cache.position == 0 and n > 1:  # a prompt: one full causal pass, then keep what later steps see
                out = self.attention(q, k, v, is_causal=True, **varlen)  # (b, n, h, d)
                cache.fill(k, v, starts)
            else:
                out = cache.attend(q, k, v)
        out = out.flatten(2)  # (b, n, embed_dim)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out)

    @staticmethod
    def _starts(sequence_starts, cache: Optional[DilatedKVCache], b: int, n: int) -> Optional[tuple[int, ...]]:
        """The first column of every row's sequence (checked), or None when every row starts at column 0."""
        if sequence_starts is None:
            return None if cache is None or not any(cache.starts) else cache.starts
        if cache is None:
            return V.check_sequence_starts(sequence_starts, b, n)
        if cache.position != 0:
            raise ValueError(f"sequence_starts belongs to the prompt: this cache is at position {cache.position} and "
                             f"keeps the starts it was filled with ({cache.starts})")
        return check_decode_starts(sequence_starts, b, n)

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, start: int, starts: Optional[tuple[int, ...]]):
        """Rotary/XPOS at column ``start..start+n-1``; a row with a sequence start counts from it, and its
        padding columns (before the start) are left as they are (they are never read)."""
        if starts is None:
            return self.rotary(q, k, start)
        q, k = q.clone(), k.clone()
        for s in sorted(set(starts)):
            rows = [i for i, x in enumerate(starts) if x == s]
            first = max(s - start, 0)  # first column of this chunk inside the rows' sequences
            q[rows, first:], k[rows, first:] = self.rotary(q[rows, first:], k[rows, first:], start + first - s)
        return q, k

    def _packed(self, x, is_causal, key_padding_mask, cache, cu_seqlens) -> torch.Tensor:
        if cache is not None or key_padding_mask is not None:
            raise ValueError("packed documents (cu_seqlens) take no decoding cache and no key_padding_mask")
        self._check_inputs(("x", x))
        b, n, _ = x.shape
        q, k, v = self._project(x, x, x)
        q = q.reshape(1, b * n, self.num_heads, self.head_dim)
        k, v = (t.reshape(1, b * n, self.num_kv_heads, self.head_dim) for t in (k, v))
        if self.rotary is not None:
            q, k = self.rotary(q, k, positions=document_positions(cu_seqlens.to(x.device), b * n))
        out = self.attention(q[0], k[0], v[0], is_causal=is_causal, cu_seqlens=cu_seqlens)  # (b*n, h, d)
        out = out.reshape(b, n, -1)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out)


class CrossAttention(nn.Module):
    """Dense multi-head cross-attention (decoder queries, encoder memory of another length), MAGNETO layout."""

    def __init__(
        self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, gamma_init: float = 1.0,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        embed_dim, num_heads = V.check_int("embed_dim", embed_dim), V.check_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.dropout = V.check_dropout("dropout", dropout)
        self.gamma_init = V.check_float("gamma_init", gamma_init, minimum=0.0)
        layer_norm_eps = V.check_float("layer_norm_eps", layer_norm_eps, minimum=0.0, inclusive=False)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj, gain in ((self.q_proj, 1.0), (self.k_proj, 1.0), (self.v_proj, self.gamma_init),
                           (self.out_proj, self.gamma_init)):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            nn.init.zeros_(proj.bias)
        self.norm.reset_parameters()

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory ``(b, s, e)`` -> k, v ``(b, h, s, d)`` (computed once per sequence when decoding)."""
        k = self.k_proj(memory).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(memory).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (b, h, n, d)
        k, v = memory_kv  # (b, h, s, d)
        mask = None if memory_padding_mask is None else ~memory_padding_mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.norm(out.transpose(1, 2).flatten(2))  # (b, n, e)
        return self.out_proj(out)


class FeedForward(nn.Module):
    """``fc2(subLN(gelu(fc1(x))))`` with MAGNETO init (xavier-normal, gain ``γ``)."""

    def __init__(self, embed_dim: int, ffn_dim: int, *, dropout: float = 0.0, gamma_init: float = 1.0,
                 layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.gamma_init = V.check_float("gamma_init", gamma_init, minimum=0.0)
        layer_norm_eps = V.check_float("layer_norm_eps", layer_norm_eps, minimum=0.0, inclusive=False)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.norm = nn.LayerNorm(ffn_dim, eps=layer_norm_eps)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_normal_(fc.weight, gain=self.gamma_init)
            nn.init.zeros_(fc.bias)
        self.norm.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.dropout(F.gelu(self.fc1(x)))))


class LongNetBlock(nn.Module):
    """Pre-LN residual block: dilated self-attention, optional cross-attention, feed-forward."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        ffn_dim: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        gamma: float,
        cross_attention: bool = False,
        num_kv_heads: Optional[int] = None,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        offsets: Union[str, Sequence[Sequence[int]]] = "paper",
        head_groups: bool = False,
        positions: Optional[str] = "rotary",
        attention_type: str = "standard",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.self_attn = DilatedSelfAttention(
            embed_dim, num_heads, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
            positions=positions, attention_type=attention_type, dropout=attention_dropout,
            layer_norm_eps=layer_norm_eps, gamma_init=gamma, num_kv_heads=num_kv_heads, offsets=offsets,
            head_groups=head_groups,
        )
        if cross_attention:
            self.cross_attn_norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
            self.cross_attn = CrossAttention(
                embed_dim, num_heads, dropout=attention_dropout, gamma_init=gamma, layer_norm_eps=layer_norm_eps
            )
        else:
            self.cross_attn_norm, self.cross_attn = None, None
        self.ffn_norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout=dropout, gamma_init=gamma, layer_norm_eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        is_causal: bool,
        key_padding_mask: Optional[torch.Tensor] = None,
        cache: Optional[DilatedKVCache] = None,
        memory_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        memory_padding_mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        sequence_starts=None,
    ) -> torch.Tensor:
        varlen = {name: v for name, v in (("cu_seqlens", cu_seqlens), ("sequence_starts", sequence_starts))
                  if v is not None}
        h = self.self_attn(self.self_attn_norm(x), is_causal=is_causal, key_padding_mask=key_padding_mask, cache=cache,
                           **varlen)
        x = x + self.dropout(h)
        if self.cross_attn is not None:
            if memory_kv is None:
                raise ValueError("this block has cross-attention: pass memory_kv (see CrossAttention.memory_kv)")
            x = x + self.dropout(self.cross_attn(self.cross_attn_norm(x), memory_kv, memory_padding_mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))
