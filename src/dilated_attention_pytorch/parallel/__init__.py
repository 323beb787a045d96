"""Sequence parallelism over ``torch.distributed`` process groups: ring (sequence shards, LongNet §3.1)
and head-parallel (all-to-all) dilated attention, and sequence-sharded block-sparse attention. Each rank
passes its contiguous shard of the sequence and gets its shard of the output, equal to the single-device
result on the whole sequence. Every call starts with one preamble (:func:`.comm.agree_call`): resolve the
process group, check the call, agree on it across ranks within a bounded time."""

from __future__ import annotations

from .block_sparse import BlockSparseRingDistributedDilatedAttention
from .comm import CommStats
from .head_parallel import (
    DistributedImprovedDilatedAttention,
    DistributedImprovedMultiheadDilatedAttention,
    head_parallel_dilated_attention,
)
from .ring import RingDilatedAttention, RingMultiheadDilatedAttention, ring_dilated_attention
from .ring_plan import RingPlan, ring_plan

__all__ = [
    "BlockSparseRingDistributedDilatedAttention",
    "CommStats",
    "DistributedImprovedDilatedAttention",
    "DistributedImprovedMultiheadDilatedAttention",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "RingPlan",
    "head_parallel_dilated_attention",
    "ring_dilated_attention",
    "ring_plan",
]
