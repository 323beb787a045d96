"""``BaseMultiheadDilatedAttention`` and ``MultiheadDilatedAttention`` (MAGNETO layout)."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import _validation as V
from .attention import BaseDilatedAttention, DilatedAttention

__all__ = ["BaseMultiheadDilatedAttention", "MultiheadDilatedAttention", "causal_mask_or_raise"]


def causal_mask_or_raise(attn_mask: Optional[torch.Tensor], n: int) -> bool:
    """An ``attn_mask`` is honoured only when it is exactly the causal mask; returns whether it was.

    Accepted: a bool ``(n, n)`` mask with ``True`` above the diagonal (``nn.MultiheadAttention``'s
    convention: ``True`` = not allowed), or a float mask with ``-inf`` above the diagonal and 0 elsewhere.
    """
    if attn_mask is None:
        return False
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.shape != (n, n):
        shape = tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
        raise ValueError(
            f"attn_mask must be None or the causal ({n}, {n}) mask, but got {shape}; dilated attention "
            "cannot honour an arbitrary mask: use is_causal=True and key_padding_mask"
        )
    future = torch.ones(n, n, dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        ok = torch.equal(attn_mask, future)
    else:
        ok = bool(torch.all(attn_mask[future] == float("-inf"))) and bool(torch.all(attn_mask[~future] == 0))
    if not ok:
        raise ValueError(
            "attn_mask is not the causal mask; dilated attention cannot honour an arbitrary mask: "
            "use is_causal=True and key_padding_mask"
        )
    return True


class BaseMultiheadDilatedAttention(nn.Module):
    """Projections around a dilated-attention core, MAGNETO style (sub-LayerNorm before ``out_proj``).

    Input ``(b, n, embed_dim)``, or ``(n, b, embed_dim)`` with ``batch_first=False`` (the meaning of
    ``nn.MultiheadAttention``'s flag, whose default is ``False``; here it is ``True``); ``key_padding_mask``
    is ``(b, n)`` either way. Packed documents: inputs ``(total, embed_dim)`` with ``cu_seqlens`` (and
    ``key_padding_mask (total,)``); left padding: ``sequence_starts`` (see :func:`dilated_attention`).
    ``forward`` returns ``(out, None)`` (weights are never materialised).
    The core is ``attention``: a :class:`BaseDilatedAttention` module, or a class (or callable) that
    builds one from ``segment_lengths, dilation_rates, softmax_scale, dropout`` and the keywords
    ``offsets``, ``head_groups``, ``backend`` and any further keyword arguments; by default the
    class's :attr:`attention_class`. A module brings its own settings: pass none of those with it.
    """

    attention_class: Callable[..., BaseDilatedAttention] = DilatedAttention
    # (this layout's weight, the other multihead layout's weight, what to do): a strict load of the other
    # layout's state dict names the conversion, not only the missing and unexpected keys
    _layout_hint: Optional[tuple[str, str, str]] = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        segment_lengths: Optional[Sequence[int]] = None,
        dilation_rates: Optional[Sequence[int]] = None,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        num_kv_heads: Optional[int] = None,
        softmax_scale: Optional[float] = None,
        offsets: Union[str, Sequence[Sequence[int]]] = "paper",
        head_groups: bool = False,
        backend: Optional[str] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        attention: Union[BaseDilatedAttention, Callable[..., BaseDilatedAttention], None] = None,
        batch_first: bool = True,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        self.batch_first = V.check_bool("batch_first", batch_first)
        embed_dim = V.check_int("embed_dim", embed_dim)
        num_heads = V.check_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else V.check_int("num_kv_heads", num_kv_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.gamma_init = V.check_float("gamma_init", gamma_init, minimum=0.0)
        layer_norm_eps = V.check_float("layer_norm_eps", layer_norm_eps, minimum=0.0, inclusive=False)
        if isinstance(attention, nn.Module):
            if segment_lengths is not None or dilation_rates is not None or attention_kwargs:
                raise TypeError("attention= is a module with its own settings: pass no segment_lengths, "
                                "dilation_rates or core keyword arguments with it")
        else:
            if segment_lengths is None or dilation_rates is None:
                raise TypeError("segment_lengths and dilation_rates are required (or attention= a module)")
            attention = (attention or self.attention_class)(
                segment_lengths, dilation_rates, softmax_scale, dropout, offsets=offsets, head_groups=head_groups,
                backend=backend, **attention_kwargs,
            )
        if not isinstance(attention, BaseDilatedAttention):
            raise TypeError(
                f"attention must be a BaseDilatedAttention (a core module with a config), but got "
                f"{type(attention).__name__}"
            )
        self.attention = attention
        c = attention.config
        V.check_offsets(c.offsets, c.dilation_rates, num_heads, c.head_groups)
        V.check_bool("bias", bias)
        V.check_bool("layer_norm", layer_norm)
        factory = {"device": device, "dtype": dtype}
        self._make_projections(bias, factory)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory) if layer_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def _check_inputs(self, *named: tuple[str, torch.Tensor]) -> None:
        """Dense ``(batch, seq, embed_dim)`` tensors (``(seq, batch, embed_dim)`` unless ``batch_first``) of one
        dtype, the parameters' dtype unless autocast is on."""
        layout = "batch, seq" if getattr(self, "batch_first", True) else "seq, batch"
        for name, t in named:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, but got {type(t).__name__}")
            V.check_dense(name, t)
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"{name} must have shape ({layout}, embed_dim={self.embed_dim}), but got {tuple(t.shape)}"
                )
        dtypes = [t.dtype for _, t in named]
        if len(set(dtypes)) != 1:
            names = ", ".join(name for name, _ in named)
            raise TypeError(f"{names} must have one dtype, but got {', '.join(map(str, dtypes))}")
        weight = self.out_proj.weight
        if dtypes[0] != weight.dtype and not torch.is_autocast_enabled(named[0][1].device.type):
            raise TypeError(
                f"{named[0][0]} has dtype {dtypes[0]}, but this module's parameters are {weight.dtype}; convert "
                f"the inputs or the module (module.to({dtypes[0]})), or run under torch.autocast"
            )

    # -- what subclasses choose ------------------------------------------------------------------
    def _make_projections(self, bias: bool, factory: dict) -> None:
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.embed_dim, kv_dim, bias=bias, **factory)

    def _qkv(self) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(weight, bias) of the q, k and v projections."""
        return [(p.weight, p.bias) for p in (self.q_proj, self.k_proj, self.v_proj)]

    def _project(self, query, key, value) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(query), self.k_proj(key), self.v_proj(value)

    def reset_parameters(self) -> None:
        """MAGNETO: xavier-normal, gain 1 for q/k and ``gamma_init`` for v/out (q, k, v each as its own
        matrix); zero biases."""
        out = (self.out_proj.weight, self.out_proj.bias)
        with torch.no_grad():
            for (w, b), gain in zip(self._qkv() + [out], (1.0, 1.0, self.gamma_init, self.gamma_init)):
                nn.init.xavier_normal_(w, gain=gain)
                if b is not None:
                    b.zero_()
        if self.norm is not None:
            self.norm.reset_parameters()

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        sequence_starts=None,
    ) -> tuple[torch.Tensor, None]:
        packed = cu_seqlens is not None
        if packed:  # (total, embed_dim): one row of packed documents
            for name, t in (("query", query), ("key", key), ("value", value)):
                if not isinstance(t, torch.Tensor) or t.dim() != 2:
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"with cu_seqlens (packed documents), {name} must have shape "
                                     f"(total, embed_dim={self.embed_dim}), but got {shape}")
            seen: dict[int, torch.Tensor] = {}
            query, key, value = (seen.setdefault(id(t), t.unsqueeze(0)) for t in (query, key, value))
        self._check_inputs(("query", query), ("key", key), ("value", value))
        if need_weights:
            warnings.warn(
                "need_weights=True: dilated attention never materialises attention weights; returning None",
                stacklevel=2,
            )
        if not self.batch_first and not packed:  # (n, b, e) -> (b, n, e), self-attention's one tensor stays one
            seen = {}
            query, key, value = (seen.setdefault(id(t), t.transpose(0, 1)) for t in (query, key, value))
        is_causal = V.check_bool("is_causal", is_causal) or causal_mask_or_raise(attn_mask, query.shape[1])
        q, k, v = self._project(query, key, value)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))  # (b, n, h, d)
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))  # (b, n, h_kv, d)
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        varlen = {name: x for name, x in (("cu_seqlens", cu_seqlens), ("max_seqlen", max_seqlen),
                                          ("sequence_starts", sequence_starts)) if x is not None}
        if packed:
            x = self.attention(q[0], k[0], v[0], is_causal=is_causal, key_padding_mask=key_padding_mask, **varlen)[None]
        else:
            x = self.attention(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, **varlen)  # (b,n,h,d)
        x = x.flatten(2)  # (b, n, embed_dim)
        if self.norm is not None:
            x = self.norm(x)
        out = self.out_proj(x)
        if packed:
            return out[0], None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        hint = self._layout_hint
        if strict and hint is not None and prefix + hint[0] not in state_dict and prefix + hint[1] in state_dict:
            error_msgs.append(f"the state dict at {prefix or 'the top level'!r} {hint[2]}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class MultiheadDilatedAttention(BaseMultiheadDilatedAttention):
    """Multi-head dilated attention with separate q/k/v projections (README, "Modules")."""

    _layout_hint = ("q_proj.weight", "qkv_proj.weight",
                    "has one fused qkv_proj weight (an ImprovedMultiheadDilatedAttention's); this module has "
                    "separate q_proj/k_proj/v_proj: load it into an ImprovedMultiheadDilatedAttention m and convert "
                    "with m.to_multihead()")
