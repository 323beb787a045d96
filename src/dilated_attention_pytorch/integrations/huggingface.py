"""Hugging Face transformers: run an existing model with ``attn_implementation="dilated"``.

    from dilated_attention_pytorch.integrations.huggingface import register_dilated_attention
    register_dilated_attention(segment_lengths=[2048, 4096], dilation_rates=[1, 2])
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="dilated")

transformers is an optional extra (``pip install 'dilated-attention-pytorch[hf]'``), imported only here,
only when :func:`register_dilated_attention` is called.

What the attention function honours: causal or bidirectional attention, padding masks (the 4-D
boolean masks transformers builds from a 2-D ``attention_mask``) and packed documents (``position_ids``
restarting per document, as ``DataCollatorWithFlattening`` makes them, or its ``cu_seq_lens_q/k``
keyword arguments). Any other mask (sliding windows, custom 4-D masks) raises ``ValueError`` — dilated
attention defines its own sparsity. Both padding sides are exact: a row's segments start at its first
valid token (left padding: ``sequence_starts``), and each packed document's at its own first token, so
every row, and every document, gives what it gives alone. With a key/value cache (``generate``), the new
queries sit at the end of the cached keys: without padding each row gathers only the keys its patterns
select (causal dilated attention is prefix-consistent, so this is exact) — no pass over the whole cache;
padded rows run the pattern over the full key length. The default cache keeps the whole history;
``hf_cache.DilatedCache`` keeps only the rows future tokens can still see (bounded memory).
"""

from __future__ import annotations

import importlib.util
from typing import Optional, Sequence

import torch

from .. import _validation as V
from ..backends import BACKENDS
from ..functional import dilated_attention
from ..models.decoding import decode_attention

__all__ = ["dilated_attention_forward_factory", "register_dilated_attention"]

DECODE_KEY = "dilated_cache_layer"  # keyword by which a bounded DilatedCache layer hands over a decode step


def _require_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(
            "the Hugging Face integration needs transformers: pip install 'dilated-attention-pytorch[hf]'"
        )


def _mask_key_valid(mask: torch.Tensor, q_len: int, kv_len: int, is_causal: bool) -> tuple[torch.Tensor, bool]:
    """A 4-D mask ``(b, 1|h, q, kv)`` (bool, True = attend; or additive float) -> (valid keys ``(b, kv)``,
    whether the mask is exactly causal/full attention restricted to those keys)."""
    if mask.dim() != 4 or mask.shape[-2:] != (q_len, kv_len):
        raise ValueError(
            f"attention_mask must be a 4-D mask (batch, 1, {q_len}, {kv_len}), but got shape {tuple(mask.shape)}"
        )
    allowed = _allowed(mask)
    key_valid = allowed.any(dim=2).all(dim=1)  # (b, kv): a key some query may see
    expected = _base(q_len, kv_len, is_causal, mask.device)[None, None] & key_valid[:, None, None, :]
    return key_valid, _same(allowed, expected)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _base(q_len: int, kv_len: int, is_causal: bool, device) -> torch.Tensor:
    base = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    return base.tril(diagonal=kv_len - q_len) if is_causal else base  # queries are the last q_len positions


def _same(allowed: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.equal(allowed.expand_as(expected) if allowed.shape[1] == 1 else allowed, expected.expand_as(allowed))


NOT_HONOURED = ("dilated attention honours only causal/bidirectional attention with padding or packed documents; "
                "this attention_mask is another pattern (sliding window or a custom mask)")


def _key_padding_from_mask(
    mask: torch.Tensor, q_len: int, kv_len: int, is_causal: bool
) -> Optional[torch.Tensor]:
    """A 4-D mask ``(b, 1|h, q, kv)`` (bool, True = attend; or additive float) -> ``key_padding_mask (b, kv)``
    (True = padding), after checking that it is exactly causal/full attention restricted to valid keys."""
    key_valid, plain = _mask_key_valid(mask, q_len, kv_len, is_causal)
    if not plain:
        raise ValueError(NOT_HONOURED)
    return None if bool(key_valid.all()) else ~key_valid


def _left_padding(padding: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``key_padding_mask (b, n)`` -> (each row's first valid position, or None when all are 0; the padding
    after it, or None when there is none): leading padding becomes a start, so segments start at the
    row's first token."""
    valid = ~padding
    n = padding.shape[1]
    starts = torch.where(valid.any(dim=1), valid.int().argmax(dim=1), n)
    rest = padding & (torch.arange(n, device=padding.device) >= starts[:, None])
    return (starts if bool(starts.any()) else None), (rest if bool(rest.any()) else None)


def _packed_cu_seqlens(mask: Optional[torch.Tensor], kwargs: dict, b: int, q_len: int, kv_len: int,
                       is_causal: bool) -> Optional[torch.Tensor]:
    """Packed documents -> ``cu_seqlens`` over the flattened ``(b * n)`` rows, or None: transformers'
    ``cu_seq_lens_q/k`` (one row), or ``position_ids`` that restart within a row (a document starts where
    a position is not the previous one + 1, as transformers finds them) with no mask or a mask that is
    exactly those documents' block-diagonal (causal) mask."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is not None and cu_k is not None and not torch.equal(cu_q, cu_k):
            raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be equal (dilated attention is self-attention)")
        if b != 1 or q_len != kv_len:
            raise ValueError(f"cu_seq_lens_q/k describe one packed row of as many queries as keys, but got batch "
                             f"{b}, {q_len} queries and {kv_len} keys")
        return cu_q if cu_q is not None else cu_k
    position_ids = kwargs.get("position_ids")
    if position_ids is None or q_len != kv_len:
        return None
    pos = position_ids.expand(b, -1)
    first = torch.ones(b, q_len, dtype=torch.bool, device=pos.device)
    first[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if mask is None and not bool(first[:, 1:].any()):
        return None
    if mask is not None:
        doc = first.flatten().cumsum(0).view(b, q_len)
        expected = (doc[:, :, None] == doc[:, None, :]) & _base(q_len, kv_len, is_causal, mask.device)
        if not _same(_allowed(mask), expected[:, None]):
            raise ValueError(NOT_HONOURED)
    starts = first.flatten().nonzero().flatten()
    return torch.cat((starts, starts.new_tensor([b * q_len])))


def dilated_attention_forward_factory(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    offsets="paper",
    head_groups: bool = False,
    backend: str = "auto",
):
    """The function transformers calls: ``(module, query, key, value, attention_mask, ...) -> (out, None)``,
    query ``(b, h, q, d)``, key/value ``(b, h_kv, kv, d)``, out ``(b, q, h, d)``."""
    segment_lengths, dilation_rates = V.check_patterns(segment_lengths, dilation_rates)
    head_groups = V.check_bool("head_groups", head_groups)
    offsets = V.check_offsets(offsets, dilation_rates, None, head_groups)
    backend = V.check_choice("backend", backend, BACKENDS)

    def dilated_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        dropout: float = 0.0,
        scaling: Optional[float] = None,
        is_causal: Optional[bool] = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        for name in ("softcap", "sliding_window", "s_aux"):
            if kwargs.get(name) is not None:
                raise ValueError(f"attn_implementation='dilated' does not support {name}={kwargs[name]!r}")
        if kwargs.get("output_attentions", False):
            raise ValueError("attn_implementation='dilated' never materialises attention weights (output_attentions)")
        causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
        q_len, kv_len = query.shape[2], key.shape[2]
        bounded = kwargs.pop(DECODE_KEY, None)
        if bounded is not None:  # a decode step on a bounded cache (hf_cache.DilatedCache)
            return _bounded_step(bounded, query, key, value, attention_mask, scaling), None
        q = query.transpose(1, 2)  # (b, q, h, d)
        k, v = key.transpose(1, 2), value.transpose(1, 2)  # (b, kv, h_kv, d)
        dropout_p = dropout if module.training else 0.0
        key_valid, plain = (None, True) if attention_mask is None else _mask_key_valid(attention_mask, q_len, kv_len,
                                                                                         causal)
        explicit = kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None
        cu = _packed_cu_seqlens(attention_mask, kwargs, q.shape[0], q_len, kv_len, causal) if (
            explicit or not plain or attention_mask is None) else None
        if cu is not None:  # packed documents: the batch flattened to one row, each document alone
            out = dilated_attention(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), segment_lengths, dilation_rates, is_causal=causal,
                scale=scaling, dropout_p=dropout_p, offsets=offsets, head_groups=head_groups, backend=backend,
                cu_seqlens=cu.to(device=q.device),
            )
            return out.view(q.shape), None
        if not plain:
            raise ValueError(NOT_HONOURED)
        padding = None if key_valid is None or bool(key_valid.all()) else ~key_valid
        starts = None
        if padding is not None:  # leading padding: the row starts there (segments from its first token)
            starts, padding = _left_padding(padding)
        if q_len != kv_len:
            if not causal or q_len > kv_len:
                raise ValueError(
                    f"dilated attention needs as many queries as keys unless causal with cached keys, but got "
                    f"{q_len} queries and {kv_len} keys (is_causal={causal})"
                )
            if padding is None and starts is None and not (module.training and dropout > 0):  # decode: gather only
                out = decode_attention(q, k, v, segment_lengths, dilation_rates, offsets=offsets,
                                       head_groups=head_groups, scale=scaling)
                return out.contiguous(), None
            # The queries are the last q_len positions: run the causal pattern over all kv_len positions and
            # keep their rows (earlier rows are zeros and discarded; causal rows never see later ones).
            q = torch.cat((q.new_zeros(q.shape[0], kv_len - q_len, *q.shape[2:]), q), dim=1)
        out = dilated_attention(
            q, k, v, segment_lengths, dilation_rates, is_causal=causal, scale=scaling,
            dropout_p=dropout_p, offsets=offsets, head_groups=head_groups, key_padding_mask=padding, backend=backend,
            sequence_starts=starts,
        )  # (b, kv, h, d)
        return out[:, kv_len - q_len :].contiguous(), None

    return dilated_attention_forward


def _bounded_step(layer, query, key, value, attention_mask, scaling) -> torch.Tensor:
    """A decode step on a bounded cache layer: query ``(b, h, q, d)``, the new key/value ``(b, h_kv, q, d)``."""
    if attention_mask is not None:
        q_len = query.shape[2]
        if _key_padding_from_mask(attention_mask, q_len, attention_mask.shape[-1], True) is not None:
            raise ValueError("DilatedCache (bounded) does not support padded batches; use the default cache")
    return layer.attend(query, key, value, scaling)


def register_dilated_attention(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    offsets="paper",
    head_groups: bool = False,
    backend: str = "auto",
    name: str = "dilated",
) -> str:
    """Register ``name`` with transformers' ``AttentionInterface`` (and ``AttentionMaskInterface``, which
    builds the boolean padding/causal masks the function checks). Returns ``name`` for
    ``attn_implementation=``. Registering again under the same name replaces the patterns."""
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not isinstance(name, str) or not name or name in ("sdpa", "eager", "flex_attention") or name.startswith("flash"):
        raise ValueError(f"name must be a new attention implementation name, but got {name!r}")
    forward = dilated_attention_forward_factory(
        segment_lengths, dilation_rates, offsets=offsets, head_groups=head_groups, backend=backend
    )
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
