"""Block-sparse attention modules: the LongNet module contract over :func:`block_sparse_attention`."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import _validation as V
from ..attention import BaseDilatedAttention
from ..multihead import BaseMultiheadDilatedAttention
from .cache import METADATA_CACHE, tensor_bytes
from .config import SparsePatternConfig
from .functional import BACKENDS, attend, sparse_args

__all__ = ["BlockSparseRingDilatedAttention", "BlockSparseRingMultiheadDilatedAttention"]


class BlockSparseRingDilatedAttention(BaseDilatedAttention):
    """Block-sparse attention with one joint softmax; the layout comes from ``sparse_config`` (default:
    LongNet's ``segment_lengths``/``dilation_rates`` at block granularity, see
    :func:`~.layouts.dilated_layout`).

    Arguments of :class:`BaseDilatedAttention`, and ``sparse_config``, ``block_size`` and ``backend``
    (the block-sparse backend: ``"auto"``, ``"portable"``, ``"flex"``, ``"triton"``). Input
    ``query (b, n, h, d)``, ``key``/``value (b, n, h_kv, d)``; output ``(b, n, h, d)``. The name is the
    seed system's; on one device there is no ring (see
    :class:`~dilated_attention_pytorch.parallel.block_sparse.BlockSparseRingDistributedDilatedAttention`
    for the sequence-sharded form).
    """

    def __init__(self, *args: Any, sparse_config: Optional[SparsePatternConfig] = None, block_size: int = 128,
                 backend: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.dropout != 0.0:
            raise ValueError(
                f"attention_dropout must be 0.0 for block-sparse attention (it has no dropout), but got "
                f"{self.config.dropout}"
            )
        if sparse_config is None:
            sparse_config = SparsePatternConfig("dilated", offsets=self.config.offsets,
                                                head_groups=self.config.head_groups)
        if not isinstance(sparse_config, SparsePatternConfig):
            raise TypeError(
                f"sparse_config must be a SparsePatternConfig or None, but got {type(sparse_config).__name__}"
            )
        self.sparse_config = sparse_config
        self.block_size = V.check_int("block_size", block_size)
        self.sparse_backend = V.check_choice("backend", "auto" if backend is None else backend, BACKENDS)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"segment_lengths={list(c.segment_lengths)}, dilation_rates={list(c.dilation_rates)}, "
            f"pattern={self.sparse_config.pattern!r}, block_size={self.block_size}, backend={self.sparse_backend!r}"
        )

    def layout(
        self,
        seq_len: int,
        num_heads: int,
        device: torch.device,
        *,
        is_causal: bool = False,
        query: Optional[torch.Tensor] = None,
        key: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The layout used for ``seq_len`` tokens (input-independent ones are cached in the metadata LRU)."""
        c = self.sparse_config

        def make() -> torch.Tensor:
            return c.build(
                seq_len, num_heads, self.block_size, device=device, segment_lengths=self.config.segment_lengths,
                dilation_rates=self.config.dilation_rates, query=query, key=key, is_causal=is_causal,
            )

        if c.content_dependent or c.pattern in ("layout", "mask_mod"):
            return make()
        key_ = ("layout", c, self.config.segment_lengths, self.config.dilation_rates, seq_len, num_heads,
                self.block_size, is_causal, str(device))
        return METADATA_CACHE.get_or_create(key_, make, tensor_bytes)

    def _attend(self, query, key, value, is_causal, key_padding_mask) -> torch.Tensor:
        if key_padding_mask is not None:
            raise ValueError(
                "key_padding_mask is not supported by block-sparse attention; mask padding blocks in the "
                "layout (or use DilatedAttention)"
            )
        V.check_qkv(query, key, value)
        layout = self.layout(query.shape[1], query.shape[2], query.device, is_causal=is_causal, query=query, key=key)
        args = sparse_args(query, layout, block_size=self.block_size, is_causal=is_causal,
                           scale=self.config.softmax_scale, return_lse=False, backend=self.sparse_backend)
        return attend(query, key, value, layout, args)[0]


class BlockSparseRingMultiheadDilatedAttention(BaseMultiheadDilatedAttention):
    """Multi-head block-sparse attention (MAGNETO layout, as :class:`MultiheadDilatedAttention`) over
    :class:`BlockSparseRingDilatedAttention`. Extra keyword arguments: ``sparse_config``,
    ``block_size``; ``backend`` is the block-sparse backend (``"auto"``, ``"portable"``, ``"flex"``, ``"triton"``)."""

    attention_class = BlockSparseRingDilatedAttention
