"""``create_block_sparse_attention``: build a block-sparse module, with checked keyword arguments."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .. import _validation as V
from ..multihead import BaseMultiheadDilatedAttention
from .distributed import BlockSparseRingDistributedDilatedAttention
from .modules import BlockSparseRingDilatedAttention, BlockSparseRingMultiheadDilatedAttention

__all__ = ["create_block_sparse_attention"]


def _accepted(cls: type) -> list[str]:
    """Constructor keyword names of ``cls`` (for the multihead class, also those of its base)."""
    classes = [cls, BaseMultiheadDilatedAttention] if cls is BlockSparseRingMultiheadDilatedAttention else [cls]
    names: list[str] = []
    for c in classes:
        for p in inspect.signature(c.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names:
                names.append(p.name)
    return names


def create_block_sparse_attention(
    *args: Any, multihead: bool = False, distributed: bool = False, **kwargs: Any
) -> nn.Module:
    """:class:`BlockSparseRingDilatedAttention`, or with ``multihead=True``
    :class:`BlockSparseRingMultiheadDilatedAttention`, or with ``distributed=True``
    :class:`BlockSparseRingDistributedDilatedAttention` (sequence-sharded). Other arguments go to the
    constructor; an unknown keyword raises TypeError listing the accepted ones."""
    multihead = V.check_bool("multihead", multihead)
    distributed = V.check_bool("distributed", distributed)
    if multihead and distributed:
        raise ValueError("multihead=True and distributed=True together are not available; choose one")
    cls = (
        BlockSparseRingMultiheadDilatedAttention if multihead
        else BlockSparseRingDistributedDilatedAttention if distributed
        else BlockSparseRingDilatedAttention
    )
    accepted = _accepted(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"{cls.__name__} got unknown keyword arguments {unknown}; accepted: {accepted}")
    return cls(*args, **kwargs)
