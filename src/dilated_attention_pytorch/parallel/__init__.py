"""Sequence parallelism over ``torch.distributed`` process groups: ring (sequence shards, LongNet §3.1)
and head-parallel (all-to-all) dilated attention. Each rank passes its contiguous shard of the sequence
and gets its shard of the output, equal to single-device ``dilated_attention`` on the whole sequence."""

from __future__ import annotations

from .comm import CommStats
from .head_parallel import (
    DistributedImprovedDilatedAttention,
    DistributedImprovedMultiheadDilatedAttention,
    head_parallel_dilated_attention,
)
from .ring import RingDilatedAttention, RingMultiheadDilatedAttention, ring_dilated_attention
from .ring_plan import RingPlan, ring_plan

__all__ = [
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
