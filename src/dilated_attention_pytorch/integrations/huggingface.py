"""Hugging Face transformers: run an existing model with ``attn_implementation="dilated"``.

    from dilated_attention_pytorch.integrations.huggingface import register_dilated_attention
    register_dilated_attention(segment_lengths=[2048, 4096], dilation_rates=[1, 2])
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="dilated")

transformers is an optional extra (``pip install 'dilated-attention-pytorch[hf]'``), imported only here,
only when :func:`register_dilated_attention` is called.

What the attention function honours: causal or bidirectional attention, and padding masks (the 4-D
boolean masks transformers builds from a 2-D ``attention_mask``). Any other mask (sliding windows,
packed sequences, custom 4-D masks) raises ``ValueError`` — dilated attention defines its own sparsity.
With a key/value cache (``generate``), the new queries sit at the end of the cached keys: each row gathers
only the keys its patterns select (causal dilated attention is prefix-consistent, so this is exact) — no
pass over the whole cache. The default cache keeps the whole history; ``hf_cache.DilatedCache`` keeps
only the rows future tokens can still see (bounded memory).
Segments are counted from index 0 of the (padded) batch, so left padding shifts them: pad on the right
when results must not depend on padding.
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


def _key_padding_from_mask(
    mask: torch.Tensor, q_len: int, kv_len: int, is_causal: bool
) -> Optional[torch.Tensor]:
    """A 4-D mask ``(b, 1|h, q, kv)`` (bool, True = attend; or additive float) -> ``key_padding_mask (b, kv)``
    (True = padding), after checking that it is exactly causal/full attention restricted to valid keys."""
    if mask.dim() != 4 or mask.shape[-2:] != (q_len, kv_len):
        raise ValueError(
            f"attention_mask must be a 4-D mask (batch, 1, {q_len}, {kv_len}), but got shape {tuple(mask.shape)}"
        )
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    key_valid = allowed.any(dim=2).all(dim=1)  # (b, kv): a key some query may see
    base = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device)
    if is_causal:
        base = base.tril(diagonal=kv_len - q_len)  # queries are the last q_len positions
    expected = base[None, None] & key_valid[:, None, None, :]
    if not torch.equal(allowed.expand_as(expected) if allowed.shape[1] == 1 else allowed, expected.expand_as(allowed)):
        raise ValueError(
            "dilated attention honours only causal/bidirectional attention with padding; this attention_mask "
            "is another pattern (sliding window, packed sequences or a custom mask)"
        )
    return None if bool(key_valid.all()) else ~key_valid


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
        padding = None if attention_mask is None else _key_padding_from_mask(attention_mask, q_len, kv_len, causal)
        q = query.transpose(1, 2)  # (b, q, h, d)
        k, v = key.transpose(1, 2), value.transpose(1, 2)  # (b, kv, h_kv, d)
        if q_len != kv_len:
            if not causal or q_len > kv_len:
                raise ValueError(
                    f"dilated attention needs as many queries as keys unless causal with cached keys, but got "
                    f"{q_len} queries and {kv_len} keys (is_causal={causal})"
                )
            if padding is None and not (module.training and dropout > 0):  # the decode path: gather, no full pass
                out = decode_attention(q, k, v, segment_lengths, dilation_rates, offsets=offsets,
                                       head_groups=head_groups, scale=scaling)
                return out.contiguous(), None
            # The queries are the last q_len positions: run the causal pattern over all kv_len positions and
            # keep their rows (earlier rows are zeros and discarded; causal rows never see later ones).
            q = torch.cat((q.new_zeros(q.shape[0], kv_len - q_len, *q.shape[2:]), q), dim=1)
        out = dilated_attention(
            q, k, v, segment_lengths, dilation_rates, is_causal=causal, scale=scaling,
            dropout_p=dropout if module.training else 0.0, offsets=offsets, head_groups=head_groups,
            key_padding_mask=padding, backend=backend,
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
