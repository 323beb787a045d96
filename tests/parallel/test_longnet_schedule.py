"""The LongNet schedule, scaled down, on 2, 4 and 8 real gloo ranks: segments ``s·4^i`` up to the first
one that covers the whole sequence, dilation ``w_i / s`` (every pattern attends ``s``-row dilated
segments), so the largest segments span every shard. Shards are not multiples of the segments; GQA,
causal and not, every offset rule. Every rank's output, LSE and dQ/dK/dV equal single-device
``dilated_attention`` on the whole sequence and the float64 reference. Fresh configurations every run."""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers.distributed import case, check_sharded, run_distributed


def longnet_schedule(base: int, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``segment_lengths = [base·4^i, ...]`` up to the first one >= ``n``; ``dilation_rates = w_i / base``."""
    segs = [base]
    while segs[-1] < n:
        segs.append(segs[-1] * 4)
    return tuple(segs), tuple(w // base for w in segs)


def longnet_cases(seed: int, world: int) -> list[dict]:
    """Random base, shard length (not a multiple of the base segment), GQA head counts, head groups; the
    LSE is returned (and gets a gradient). Up to 4 ranks: one case per (offset rule, causal); at 8 ranks
    (slower on 2 CPU cores) one per offset rule, causal and not both among them."""
    rnd = random.Random(seed)
    cases = []
    first_causal = rnd.random() < 0.5
    for i, offsets in enumerate(("paper", "torchscale", "group")):
        for causal in (False, True) if world <= 4 else ((first_causal if i == 0 else not first_causal),):
            base = rnd.choice([2, 3, 4, 5])
            n_local = rnd.choice([m for m in range(16, 49 if world <= 4 else 33) if m % base])
            segs, dils = longnet_schedule(base, world * n_local)
            h_kv = rnd.choice([1, 2])
            h = h_kv * rnd.choice([2, 3])  # GQA: several query heads per key/value head
            cases.append(case(
                b=1, n_local=n_local, h=h, h_kv=h_kv, d=8, segs=segs, dils=dils, causal=causal, offsets=offsets,
                head_groups=rnd.random() < 0.3 and h >= len(segs), mask=rnd.random() < 0.2, lse=True, spanning=True,
            ))
    return cases


def test_schedule_spans_every_shard():
    segs, dils = longnet_schedule(3, 8 * 20)
    assert segs == (3, 12, 48, 192) and dils == (1, 4, 16, 64)
    assert segs[-1] >= 8 * 20 > segs[-2]  # the largest segment is the whole sequence


@pytest.mark.parametrize("world", [2, 4, 8])
def test_longnet_schedule_on_gloo_ranks(world):
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh configurations and inputs every run
    cases = longnet_cases(seed, world)
    run_distributed(check_sharded, world, cases, "ring", seed, timeout_s=240, pg_timeout_s=120)
