"""Eight ranks on one real gloo process group: ring and head-parallel shards equal single-device
``dilated_attention`` on the whole sequence and the float64 reference, forward and gradients, and the
ring's bytes sent per rank stay flat as the sequence grows."""

from __future__ import annotations

import torch

from tests.helpers.distributed import case, check_bytes_flat, check_sharded, random_cases, run_distributed

WORLD = 8
RING_CASES = [
    case(b=1, n_local=5, h=4, h_kv=2, segs=(4, 16, 40), dils=(1, 2, 5), causal=True),  # one segment spans all 8
    case(b=1, n_local=3, h=2, h_kv=1, segs=(6, 24), dils=(2, 3), offsets="torchscale", mask=True, lse=True),
    case(b=1, n_local=8, h=4, h_kv=2, segs=(4, 8), dils=(1, 2), causal=True, spanning=False),  # local only
    case(b=1, n_local=2, h=3, h_kv=1, segs=(16,), dils=(7,), causal=True),  # r > n_local: ranks without rows
]
HEAD_PARALLEL_CASES = [
    case(b=1, n_local=5, h=8, h_kv=2, segs=(4, 16, 40), dils=(1, 2, 5), causal=True),  # kv heads repeated
    case(b=1, n_local=3, h=8, h_kv=8, segs=(6, 24), dils=(2, 3), head_groups=True, mask=True, lse=True),
]


def _check_all(rank: int, world: int, seed: int) -> None:
    check_sharded(rank, world, RING_CASES + random_cases(seed, 2, world), "ring", seed)
    check_sharded(rank, world, HEAD_PARALLEL_CASES + random_cases(seed + 1, 1, world, head_multiple=world),
                  "head_parallel", seed + 7)
    check_bytes_flat(rank, world, (3, 8, 20), (1, 2, 4), (27, 27 + 120, 27 + 240), b=1, h=2, h_kv=2, d=4)


def test_ring_and_head_parallel_on_eight_ranks():
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh configurations and inputs every run
    run_distributed(_check_all, WORLD, seed, timeout_s=300, pg_timeout_s=120)
