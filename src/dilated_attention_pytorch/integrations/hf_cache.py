"""A bounded key/value cache for Hugging Face ``generate`` with ``attn_implementation="dilated"``.

    name = register_dilated_attention(segment_lengths=[2048, 4096], dilation_rates=[1, 2])
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)
    cache = DilatedCache(model.config, segment_lengths=[2048, 4096], dilation_rates=[1, 2])
    out = model.generate(ids, past_key_values=cache, max_new_tokens=50)

Per layer it keeps a :class:`~dilated_attention_pytorch.models.DilatedKVCache`: only the keys future tokens can
still see (each pattern's current segment, of each head's phase), so memory stays flat however long the
generation; with ``max_length`` (prompt plus new tokens) the fixed-shape
:class:`~dilated_attention_pytorch.models.StaticDilatedKVCache` (Triton kernels on CUDA, allocated once). The prompt's forward pass runs the block path over the prompt; each later step runs the small
gather path over the cached rows. The patterns must be those registered for the attention function.
Importing this module imports transformers (the ``hf`` extra). Padded batches are not supported (a padding
mask raises ``ValueError``); the default cache handles them.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Union

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import _validation as V
from ..models.decoding import DilatedKVCache
from ..models.static_decoding import StaticDilatedKVCache
from .huggingface import DECODE_KEY

__all__ = ["DilatedCache", "DilatedCacheLayer"]



class DilatedCacheLayer(CacheLayerMixin):
    """One decoder layer's bounded cache (created lazily: batch, heads, dtype come from the first keys)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, segment_lengths, dilation_rates, offsets, head_groups, num_heads: int,
                 max_length: Optional[int] = None) -> None:
        super().__init__()
        self.patterns = (segment_lengths, dilation_rates, offsets, head_groups)
        self.num_heads, self.max_length = num_heads, max_length
        self.cache: Optional[Union[DilatedKVCache, StaticDilatedKVCache]] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        ws, rs, offsets, head_groups = self.patterns
        b, h_kv, _, d = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        kwargs = dict(
            segment_lengths=ws, dilation_rates=rs, offsets=offsets, head_groups=head_groups, num_heads=self.num_heads,
            num_kv_heads=h_kv, head_dim=d, scale=None, batch_size=b, device=key_states.device, dtype=key_states.dtype,
        )
        if self.max_length is None:
            self.cache = DilatedKVCache(**kwargs)
        else:
            self.cache = StaticDilatedKVCache(max_length=self.max_length, **kwargs)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, kwargs=None, **extra):
        """Keys/values ``(b, h_kv, q, d)``. A prompt (empty cache): keep its bounded rows and return it whole
        for the block path. Later tokens: hand this layer to the attention function through ``kwargs`` (the
        attention call's keyword arguments) and return the new keys/values only."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.cache.position == 0:
            self.cache.fill(key_states.transpose(1, 2), value_states.transpose(1, 2))
            return key_states, value_states
        if kwargs is None:
            raise ValueError(
                "DilatedCache needs the attention call's keyword arguments (cache.update(..., kwargs=kwargs), as "
                "Llama-style models in transformers >= 5 pass them); this model does not pass them"
            )
        kwargs[DECODE_KEY] = self
        return key_states, value_states

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: Optional[float]):
        """query ``(b, h, q, d)``, key/value ``(b, h_kv, q, d)`` of the next tokens -> out ``(b, q, h, d)``."""
        self.cache.scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        return self.cache.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.cache is None else self.cache.position

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache, self.is_initialized = None, False

    def numel(self) -> int:
        return 0 if self.cache is None else self.cache.numel()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.cache is not None:
            self.cache.reorder(beam_idx.to(self.cache.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices, device=self.device).reshape(-1))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.cache is not None:
            self.reorder_cache(torch.arange(self.cache.batch_size, device=self.device).repeat_interleave(repeats))


class DilatedCache(Cache):
    """A ``transformers`` cache whose layers keep only the rows dilated attention can still use.

    ``config``: the model's config (``num_attention_heads``); the patterns, offsets and head groups must be
    those given to :func:`~dilated_attention_pytorch.integrations.huggingface.register_dilated_attention`.
    ``max_length``: tokens per row (prompt plus new ones) of fixed-shape layers (one new token per step; beam
    search keeps its batch); None grows the buffers as keys arrive."""

    def __init__(self, config, segment_lengths: Sequence[int], dilation_rates: Sequence[int], *, offsets="paper",
                 head_groups: bool = False, max_length: Optional[int] = None) -> None:
        segment_lengths, dilation_rates = V.check_patterns(segment_lengths, dilation_rates)
        head_groups = V.check_bool("head_groups", head_groups)
        num_heads = config.get_text_config(decoder=True).num_attention_heads
        offsets = V.check_offsets(offsets, dilation_rates, num_heads, head_groups)
        if max_length is not None:
            max_length = V.check_int("max_length", max_length)
        super().__init__(layer_class_to_replicate=partial(
            DilatedCacheLayer, segment_lengths, dilation_rates, offsets, head_groups, num_heads, max_length))

    def numel(self) -> int:
        """Elements held by every layer's key and value buffers (bounded by the patterns)."""
        return sum(layer.numel() for layer in self.layers)
