"""Issue 13, distributed items on real gloo process groups (no mocks): ``"auto"`` never turns on sequence
parallelism under a data-parallel job; a rank that fails or stops after the agreement check makes the
others raise within ``timeout_s``; the strategy is part of the agreed configuration; mismatch messages
show every rank's values; no process group is a ``ValueError``."""

from __future__ import annotations

import math
import time

import pytest
import torch

from dilated_attention_pytorch import DilatedAttention, MultiheadDilatedAttention, dilated_attention
from dilated_attention_pytorch.block_sparse import BlockSparseRingDistributedDilatedAttention
from dilated_attention_pytorch.factory import (
    attention_class, create_dilated_attention, create_multihead_dilated_attention, explain_auto,
)
from dilated_attention_pytorch.parallel import ring as ring_module
from dilated_attention_pytorch.parallel.head_parallel import (
    DistributedImprovedDilatedAttention, DistributedImprovedMultiheadDilatedAttention,
    head_parallel_dilated_attention,
)
from dilated_attention_pytorch.parallel.ring import (
    RingDilatedAttention, RingMultiheadDilatedAttention, ring_dilated_attention,
)
from dilated_attention_pytorch.reference import reference_dilated_attention

from tests.helpers.distributed import TOL, run_distributed

SEGS, DILS = (4, 16), (1, 2)


# -- item 1: "auto" under data parallelism ---------------------------------------------------------
def _check_auto_is_data_parallel(rank: int, world: int, seed: int) -> None:
    """DDP-style: every rank holds its own whole sequences; "auto" modules give each rank exactly the
    single-device result on its own data (a ring would mix the ranks' sequences)."""
    single = "improved" if torch.cuda.is_available() else "standard"
    g = torch.Generator().manual_seed(seed + rank)  # different data on every rank
    n = 20  # segments of 16 would cross a shard boundary of a 2-rank ring
    q, k, v = (torch.randn(2, n, h, 8, dtype=torch.float64, generator=g) for h in (4, 2, 2))
    for causal in (False, True):
        module = create_dilated_attention("auto", SEGS, DILS)
        assert type(module) is attention_class(single)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = module(*leaves, is_causal=causal)
        out.sum().backward()
        own = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = DilatedAttention(SEGS, DILS)(*own, is_causal=causal)
        expected.sum().backward()
        assert torch.equal(out, expected), f"rank {rank}: auto differs from the single-device result"
        for a, b in zip(leaves, own):
            assert torch.equal(a.grad, b.grad)
        ref, _ = reference_dilated_attention(q, k, v, SEGS, DILS, is_causal=causal)
        torch.testing.assert_close(out, ref, **TOL)

    x = torch.randn(2, n, 16, dtype=torch.float64, generator=g)
    kw = dict(embed_dim=16, num_heads=4, segment_lengths=SEGS, dilation_rates=DILS, dtype=torch.float64)
    module = create_multihead_dilated_attention("auto", **kw)
    assert type(module) is attention_class(single, multihead=True)
    twin = module.to_multihead() if hasattr(module, "to_multihead") else MultiheadDilatedAttention(**kw)
    twin.load_state_dict(module.state_dict())
    out, _ = module(x, x, x, is_causal=True)
    assert torch.equal(out, twin(x, x, x, is_causal=True)[0]), f"rank {rank}: multihead auto is not single-device"

    choice = explain_auto()  # and it says why
    assert choice.attention_type == single, choice
    assert f"a process group of {world} ranks is initialised, but auto never turns on sequence parallelism" in str(
        choice
    ) and "pass 'ring'" in str(choice), choice


def test_auto_is_single_device_under_data_parallel():
    run_distributed(_check_auto_is_data_parallel, 2, int(torch.randint(0, 2**31, ()).item()), timeout_s=120)


# -- item 6: agreement on strategy and settings, messages with values --------------------------------
def _check_mismatches(rank: int, world: int) -> None:
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    strategies = (r"every rank must call the same sequence-parallel strategy, but got rank 0: ring "
                  r"\(ring_dilated_attention.*; rank 1: head-parallel \(head_parallel_dilated_attention")
    with pytest.raises(ValueError, match=strategies):
        if rank == 0:
            ring_dilated_attention(q, q, q, [4], [1])
        else:
            head_parallel_dilated_attention(q, q, q, [4], [1])
    with pytest.raises(ValueError, match=r"rank 0: block-sparse .*; rank 1: ring"):
        if rank == 0:
            BlockSparseRingDistributedDilatedAttention([4], [1], block_size=4)(q, q, q)
        else:
            RingDilatedAttention([4], [1])(q, q, q)

    # Values per rank, not digests or codes; several differing settings at once; lists of different lengths.
    x = q.float() if rank == 0 else q
    with pytest.raises(ValueError, match=r"dtype per rank \[torch.float32, torch.float64\]"):
        ring_dilated_attention(x, x, x, [4], [1])
    with pytest.raises(ValueError, match=r"scale per rank \[0.5, 0.25\]"):
        head_parallel_dilated_attention(q, q, q, [4], [1], scale=0.5 if rank == 0 else 0.25)
    segs, dils = ([4, 8], [1, 2]) if rank == 0 else ([4], [1])
    with pytest.raises(ValueError, match=r"segment_lengths per rank \[\(4, 8\), \(4,\)\]; "
                                         r"dilation_rates per rank \[\(1, 2\), \(1,\)\]"):
        head_parallel_dilated_attention(q, q, q, segs, dils)
    with pytest.raises(ValueError, match=r"block_size per rank \[4, 8\]"):
        BlockSparseRingDistributedDilatedAttention([8], [1], block_size=4 * (rank + 1))(q, q, q)
    short = torch.randn(1, 8 if rank == 0 else 16, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"n_local \(shard length\) per rank \[8, 16\]"):
        BlockSparseRingDistributedDilatedAttention([8], [1], block_size=4)(short, short, short)

    # An invalid timeout on one rank: its own error there, a clear one on the other rank.
    if rank == 0:
        with pytest.raises(ValueError, match="timeout_s must be a finite positive number of seconds, but got 0"):
            ring_dilated_attention(q, q, q, [4], [1], timeout_s=0)
    else:
        with pytest.raises(ValueError, match=r"rank\(s\) \[0\] passed invalid inputs"):
            ring_dilated_attention(q, q, q, [4], [1])
    with pytest.warns(DeprecationWarning, match="check_timeout_s is deprecated: use timeout_s"):
        ring_dilated_attention(q, q, q, [4], [1], check_timeout_s=5)

    # The group is still usable: a correct sharded result.
    g = torch.Generator().manual_seed(11)
    whole = torch.randn(1, 8 * world, 2, 4, dtype=torch.float64, generator=g)
    sl = slice(rank * 8, (rank + 1) * 8)
    out = ring_dilated_attention(whole[:, sl], whole[:, sl], whole[:, sl], [16], [2], timeout_s=5)
    torch.testing.assert_close(out, dilated_attention(whole, whole, whole, [16], [2])[:, sl], **TOL)


# -- item 6: a rank that fails or stops after the agreement check -------------------------------------
TIMEOUT = 2.0
SLACK = 3.0


def _expect_raise_within(pattern: str, fn, bound: float = TIMEOUT) -> None:
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=pattern):
        fn()
    elapsed = time.monotonic() - t0
    assert elapsed < bound + SLACK, f"raised after {elapsed:.1f} s, bound {bound} s"


def _check_failing_rank(rank: int, world: int) -> None:
    import torch.distributed as dist

    g = torch.Generator().manual_seed(3)
    whole = torch.randn(1, 16 * world, 2, 4, dtype=torch.float64, generator=g)
    sl = slice(rank * 16, (rank + 1) * 16)
    x = whole[:, sl]
    segs, dils = (8, 32), (1, 2)  # segments of 32 span both shards: rows travel both ways

    # 1. Ring forward: rank 1 agrees on the call, then stops taking part (alive, busy elsewhere).
    group = dist.new_group([0, 1])
    if rank == 0:
        _expect_raise_within(
            r"ring_dilated_attention: (sending|receiving) key/value rows \(forward\) (to|from) rank 1 did not "
            r"complete within timeout_s=2 s: a rank failed, exited or stopped taking part",
            lambda: ring_dilated_attention(x, x, x, segs, dils, process_group=group, timeout_s=TIMEOUT),
        )
    else:
        ring_module._agree(x, x, x, segs, dils, group, False, None, 0.0, "paper", False, None, False, "auto",
                           None, TIMEOUT, None)
        time.sleep(TIMEOUT + 1)

    # 2-4. Forward on every rank, then rank 1 never runs backward (its loss failed, say): rank 0's backward
    # raises within the bound, for every strategy and module form.
    def forward_then_backward_on_rank_0(make_output, pattern):
        group = dist.new_group([0, 1])
        leaf = x.clone().requires_grad_()
        out = make_output(leaf, group)
        if rank == 0:
            _expect_raise_within(pattern, lambda: out.sum().backward())
        else:
            time.sleep(TIMEOUT + 1)

    forward_then_backward_on_rank_0(
        lambda t, grp: RingDilatedAttention(segs, dils, process_group=grp, timeout_s=TIMEOUT)(t, t, t),
        r"ring_dilated_attention: (sending|receiving) key/value gradients \(backward\) (to|from) rank 1 did not "
        r"complete within timeout_s=2 s",
    )
    forward_then_backward_on_rank_0(
        lambda t, grp: head_parallel_dilated_attention(t, t, t, segs, dils, process_group=grp, timeout_s=TIMEOUT),
        r"head_parallel_dilated_attention: the all-to-all of gradient of output heads \(backward\) did not complete "
        r"within timeout_s=2 s",
    )
    forward_then_backward_on_rank_0(
        lambda t, grp: BlockSparseRingDistributedDilatedAttention(
            segs, dils, block_size=4, process_group=grp, timeout_s=TIMEOUT)(t, t, t),
        r"BlockSparseRingDistributedDilatedAttention: the all-to-all of key/value block gradients \(backward\) did "
        r"not complete within timeout_s=2 s",
    )

    # 5. Rank 1 agrees on a ring call, then its process exits: rank 0 raises as soon as the connection
    # drops (not after the generous bound), naming the transfer.
    if rank == 0:
        _expect_raise_within(
            r"ring_dilated_attention: (sending|receiving) key/value rows \(forward\) (to|from) rank 1 (failed after "
            r"[0-9.]+ s \(timeout_s=10 s\)|.* could not be started): a rank failed, exited or stopped taking part",
            lambda: ring_dilated_attention(x, x, x, segs, dils, timeout_s=10), bound=10,
        )
    else:
        ring_module._agree(x, x, x, segs, dils, None, False, None, 0.0, "paper", False, None, False, "auto",
                           None, 10, None)


def _check_agreement_and_failing_ranks(rank: int, world: int) -> None:
    _check_mismatches(rank, world)  # leaves the group usable
    _check_failing_rank(rank, world)  # leaves groups broken, rank 1 exits at the end


def test_agreement_mismatches_and_failing_ranks():
    """One process group (to keep the suite fast): mismatches first, then ranks failing after agreement."""
    run_distributed(_check_agreement_and_failing_ranks, 2, timeout_s=120, pg_timeout_s=20, final_barrier=False)


# -- single process: no process group, timeout validation ---------------------------------------------
def test_no_process_group_is_a_value_error_naming_what_is_missing():
    q, e = torch.randn(1, 8, 2, 4), torch.randn(1, 8, 8)
    mha = RingMultiheadDilatedAttention(8, 2, segment_lengths=[4], dilation_rates=[1])
    calls = [
        ("ring_dilated_attention", lambda: ring_dilated_attention(q, q, q, [4], [1])),
        ("ring_dilated_attention", lambda: mha(e, e, e)),
        ("head_parallel_dilated_attention", lambda: head_parallel_dilated_attention(q, q, q, [4], [1])),
        ("head_parallel_dilated_attention", lambda: DistributedImprovedDilatedAttention([4], [1])(q, q, q)),
        ("BlockSparseRingDistributedDilatedAttention",
         lambda: BlockSparseRingDistributedDilatedAttention([4], [1], block_size=4)(q, q, q)),
    ]
    for name, call in calls:
        with pytest.raises(ValueError, match=f"{name} needs an initialised torch.distributed process group"):
            call()


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1.0, ValueError), (math.nan, ValueError),
                                        (math.inf, ValueError), ("5", TypeError), (True, TypeError)])
def test_timeout_is_validated_by_every_module(bad, error):
    makers = [
        lambda: RingDilatedAttention([4], [1], timeout_s=bad),
        lambda: RingMultiheadDilatedAttention(8, 2, segment_lengths=[4], dilation_rates=[1], timeout_s=bad),
        lambda: DistributedImprovedDilatedAttention([4], [1], timeout_s=bad),
        lambda: DistributedImprovedMultiheadDilatedAttention(8, 2, segment_lengths=[4], dilation_rates=[1],
                                                             timeout_s=bad),
        lambda: BlockSparseRingDistributedDilatedAttention([4], [1], block_size=4, timeout_s=bad),
    ]
    for make in makers:
        with pytest.raises(error, match=r"timeout_s must be a .*but got"):
            make()
    module = RingMultiheadDilatedAttention(8, 2, segment_lengths=[4], dilation_rates=[1], timeout_s=7)
    assert module.attention.timeout_s == 7.0


# ---- item 3 on the ring: NaN in a real query propagates through the received-rows path --------------


def _check_ring_nan_propagates(rank: int, world: int, seed: int) -> None:
    """Segments cross the shard edge (received rows run the ring's own blocks): a NaN query row gives
    NaN output and a NaN query gradient on its rank, as on one device; every other row stays finite."""
    g = torch.Generator().manual_seed(seed)
    n_local, segs, dils = 12, (8, 24), (1, 2)
    q, k, v = (torch.randn(1, n_local * world, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t = n_local + 5  # a row of rank 1
    q[0, t] = float("nan")
    sl = slice(rank * n_local, (rank + 1) * n_local)
    shard = [x[:, sl].clone().requires_grad_() for x in (q, k, v)]
    out, lse = ring_dilated_attention(*shard, segs, dils, return_lse=True, timeout_s=30)
    whole = dilated_attention(q.clone().requires_grad_(), k, v, segs, dils, return_lse=True)
    assert torch.equal(out.isnan(), whole[0][:, sl].isnan()) and torch.equal(lse.isnan(), whole[1][:, :, sl].isnan())
    (dq,) = torch.autograd.grad((out, lse), shard[0], (torch.randn_like(out), torch.randn_like(lse)))
    local = t - rank * n_local
    if 0 <= local < n_local:
        assert out[0, local].isnan().any() and dq[0, local].isnan().any()
    rows = [i for i in range(n_local) if i != local]
    assert not out[0, rows].isnan().any()


def test_ring_nan_query_propagates():
    run_distributed(_check_ring_nan_propagates, 2, int(torch.randint(0, 2**31, ()).item()), timeout_s=120)
