"""Ring (sequence-parallel) dilated attention on real gloo process groups: every rank's shard of the
output and of the gradients equals single-device ``dilated_attention`` on the gathered whole, and the
float64 dense reference."""

from __future__ import annotations

import time

import pytest
import torch

from dilated_attention_pytorch import dilated_attention
from dilated_attention_pytorch.parallel.comm import CommStats
from dilated_attention_pytorch.parallel.ring import (
    RingDilatedAttention, RingMultiheadDilatedAttention, ring_dilated_attention,
)
from dilated_attention_pytorch.parallel.ring_plan import ring_plan

from tests.helpers.distributed import (
    TOL, case, case_inputs, check_bytes_flat, check_sharded, random_cases, run_distributed,
)

# world -> cases; "spanning" says whether some segment crosses a shard boundary (the communicating path).
CASES = {
    2: [
        case(),
        case(causal=True),
        case(segs=(4, 12), dils=(1, 3), spanning=False),  # every segment inside a shard: local only
        case(segs=(4, 12), dils=(1, 3), causal=True, spanning=False),
        case(segs=(4, 12), dils=(1, 3), causal=True, mask=True, lse=True, h_kv=2, spanning=False),
        case(n_local=13, segs=(8, 16, 32), dils=(1, 2, 4)),  # n not a multiple of w; W = min(w, n)
        case(n_local=13, segs=(8, 16, 32), dils=(1, 2, 4), causal=True),
        case(n_local=11, segs=(6, 10), dils=(4, 3), causal=True),  # r does not divide W
        case(h=4, h_kv=2, offsets="torchscale", causal=True),  # GQA
        case(h=6, h_kv=1, segs=(5, 9, 24), dils=(1, 2, 3), offsets="group"),
        case(h=6, h_kv=3, segs=(5, 9, 24), dils=(1, 2, 3), head_groups=True, causal=True),
        case(h=4, offsets=[[0, 0, 0, 0], [1, 0, 1, 1]], causal=True),  # explicit offsets
        case(segs=(7, 24), dils=(2, 5), mask=True),  # key padding mask (some rows see no key)
        case(segs=(7, 24), dils=(2, 5), mask=True, causal=True, lse=True),  # LSE returned, with gradient
        case(n_local=9, segs=(4, 30), dils=(2, 3), lse=True),
        # A core tiled by whole segments (single-device on it) plus margins with spanning segments:
        case(n_local=13, segs=(2, 4), dils=(1, 2), causal=True, mask=True, lse=True),
        case(n_local=23, segs=(3, 6), dils=(1, 3), h_kv=2, offsets="torchscale"),
    ],
    4: [
        case(n_local=7, segs=(5, 12, 40), dils=(1, 3, 5)),  # one segment spans all four ranks
        case(n_local=7, segs=(5, 12, 40), dils=(1, 3, 5), causal=True, h_kv=2),
        case(n_local=6, segs=(3, 6), dils=(1, 2), causal=True, spanning=False),
        case(n_local=5, segs=(8, 13), dils=(2, 3), offsets="torchscale", mask=True, lse=True, causal=True),
        case(n_local=3, segs=(12,), dils=(5,), causal=True),  # r > n_local: ranks without rows of an offset
        case(b=1, n_local=1, h=2, h_kv=1, segs=(2, 3), dils=(1, 2)),  # one token per rank
        case(n_local=9, segs=(2, 4, 8), dils=(1, 2, 4), causal=True, h_kv=2, lse=True),  # core + margins
    ],
}
RANDOM_CASES = {2: 12, 4: 4}


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_single_device_and_reference(world):
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh configurations and inputs every run
    cases = CASES[world] + random_cases(seed, RANDOM_CASES[world], world)
    run_distributed(_check_world, world, cases, seed, timeout_s=150)


def _check_world(rank: int, world: int, cases, seed: int) -> None:
    check_sharded(rank, world, cases, "ring", seed)
    if world == 4:
        _check_subgroups(rank, world)


def _check_bytes_flat(rank: int, world: int) -> None:
    """Bytes sent per rank do not grow with the total length for fixed w/r (forward and backward)."""
    check_bytes_flat(rank, world, (6, 10, 20), (1, 2, 4), (13, 13 + 60, 13 + 240))


def test_ring_bytes_sent_flat_in_sequence_length():
    run_distributed(_check_bytes_flat, 2)


def test_ring_plan_core_and_margins():
    """Rows tiled by whole segments of every pattern form a core run by single-device attention; the
    plan's own blocks cover exactly the other rows, once per pattern that covers them."""
    for world, n_local, segs, dils in ((2, 13, (2, 4), (1, 2)), (4, 9, (2, 4, 8), (1, 2, 4)),
                                       (2, 261_120, (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16))):
        cores = []
        for rank in range(world):
            plan = ring_plan(world, rank, n_local, 4, 4, segs, dils, "group", False, True)
            c0, c1 = plan.core
            assert not plan.local_only
            cores.append(c1 - c0)
            covered = torch.zeros(n_local, dtype=torch.long)
            for block in plan.own_blocks:
                span = block.span
                for seg in range(span.count):
                    start = span.start + seg * span.segment + block.offset
                    covered[start : start + block.dilation * span.rows : block.dilation] += 1
            n = world * n_local
            expected = torch.zeros(n_local, dtype=torch.long)
            for i, (w, r) in enumerate(zip(segs, dils)):  # "group" offsets: o_i = i mod r_i for every head
                t = torch.arange(rank * n_local, (rank + 1) * n_local)
                expected += (((t % min(w, n)) % r) == i % r).long()
            assert (covered[c0:c1] == 0).all()
            assert torch.equal(covered[:c0], expected[:c0]) and torch.equal(covered[c1:], expected[c1:])
        assert max(cores) > 0, cores


def test_ring_plan_bytes_bounded_for_large_n():
    """Pure plan math at large n: bytes per rank bounded by the boundary segments, independent of n."""
    segs, dils = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16)
    for world in (2, 4, 8):
        per_n = []
        for n_local in (40_000, 80_000, 1_000_000):
            sent = [ring_plan(world, r, n_local, 16, 16, segs, dils).forward_bytes_sent(1, 128, 2)
                    for r in range(world)]
            per_n.append(max(sent))
            # A boundary cuts at most one segment per pattern; rank p sends at most its rows of the two
            # segments at its edges: <= 2 * sum(W/r rows, ceil) * h * d * 2 (k and v) * 2 bytes.
            bound = 2 * sum(-(-w // r) for w, r in zip(segs, dils)) * 16 * 128 * 2 * 2
            assert max(sent) <= bound
        assert per_n[0] > 0
        aligned = [ring_plan(world, 0, 262_144, 16, 16, segs, dils) for _ in (0,)][0]
        assert aligned.local_only  # every w divides 256K: no communication at all (LongNet §3.1)


def _check_errors(rank: int, world: int) -> None:
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    # A rank with a wrong shard length: every rank gets a clear error, nobody hangs.
    bad = torch.randn(1, 7 if rank == 1 else 8, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"n_local \(shard length\).*\[8, 7\]"):
        ring_dilated_attention(bad, bad, bad, [4], [1])
    # Ranks disagreeing on the patterns: the message shows every rank's value.
    with pytest.raises(ValueError, match=r"segment_lengths per rank \[\(4,\), \(8,\)\]"):
        ring_dilated_attention(q, q, q, [4] if rank == 0 else [8], [1])
    # Disagreeing on causality.
    with pytest.raises(ValueError, match=r"is_causal per rank \[True, False\]"):
        ring_dilated_attention(q, q, q, [4], [1], is_causal=rank == 0)
    # An invalid input on one rank only: that rank gets its own error, the others a clear one.
    if rank == 0:
        with pytest.raises(ValueError, match="dilation_rates\\[0\\] must be <= segment_lengths\\[0\\]"):
            ring_dilated_attention(q, q, q, [4], [5])
    else:
        with pytest.raises(ValueError, match=r"rank\(s\) \[0\] passed invalid inputs"):
            ring_dilated_attention(q, q, q, [4], [1])
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        ring_dilated_attention(q, q, q, [4], [1], dropout_p=0.1)
    # The group is still usable after the errors.
    out = ring_dilated_attention(q, q, q, [16], [2])
    assert out.shape == q.shape


def test_ring_errors_reach_every_rank():
    run_distributed(_check_errors, 2, timeout_s=60)


def _check_low_precision(rank: int, world: int, seed: int) -> None:
    """bf16: the ring's error vs the float64 reference stays within 2x single-device bf16's (out and grads)."""
    c = case(n_local=40, segs=(8, 16, 64), dils=(1, 2, 4), h_kv=2, d=16, causal=True, n_total=40 * world)
    q, k, v, dout, _, _ = case_inputs(c, seed=seed)
    sl = slice(rank * c["n_local"], (rank + 1) * c["n_local"])

    def run(fn, tensors, grad, dtype, **kw):
        leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
        out = fn(*leaves, c["segs"], c["dils"], is_causal=True, **kw)
        (out.double() * grad).sum().backward()
        return [out.double()] + [t.grad.double() for t in leaves]

    ref = [t[:, sl] for t in run(dilated_attention, (q, k, v), dout, torch.float64, backend="reference")]
    single = [t[:, sl] for t in run(dilated_attention, (q, k, v), dout, torch.bfloat16)]
    ring = run(ring_dilated_attention, [t[:, sl] for t in (q, k, v)], dout[:, sl], torch.bfloat16)
    for name, r, s, x in zip(("out", "dq", "dk", "dv"), ref, single, ring):
        err_single, err_ring = (s - r).norm() / r.norm(), (x - r).norm() / r.norm()
        assert err_ring <= 2 * err_single + 1e-3, (name, rank, seed, err_ring.item(), err_single.item())


def test_ring_bf16_error_within_twice_single_device():
    run_distributed(_check_low_precision, 2, int(torch.randint(0, 2**31, ()).item()), timeout_s=60)


def _check_subgroups(rank: int, world: int) -> None:
    """Sequence parallel over sub-groups (as in data × sequence parallel meshes): ranks {0,1} and {2,3}
    each shard their own sequence; peers are group ranks, mapped to global ranks for the transfers."""
    import torch.distributed as dist

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group, pair, local = groups[rank // 2], rank // 2, rank % 2
    c = case(n_local=11, segs=(4, 16), dils=(1, 2), causal=True, h_kv=2, n_total=22)
    q, k, v, dout, _, _ = case_inputs(c, seed=500 + pair)  # a different sequence per group
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    (dilated_attention(*whole, c["segs"], c["dils"], is_causal=True) * dout).sum().backward()
    sl = slice(local * 11, (local + 1) * 11)
    shard = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
    stats = CommStats()
    out = ring_dilated_attention(*shard, c["segs"], c["dils"], is_causal=True, process_group=group, stats=stats)
    (out * dout[:, sl]).sum().backward()
    assert stats.bytes_sent > 0
    ref = dilated_attention(q, k, v, c["segs"], c["dils"], is_causal=True)
    torch.testing.assert_close(out, ref[:, sl], **TOL)
    for t, w in zip(shard, whole):
        torch.testing.assert_close(t.grad, w.grad[:, sl], **TOL)


def _check_missing_rank(rank: int, world: int) -> None:
    """A rank that never calls: the others raise after timeout_s instead of hanging."""
    q = torch.randn(1, 8, 2, 4)
    if rank == 0:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="not every rank of the process group reached the call within 2 s"):
            ring_dilated_attention(q, q, q, [4], [1], timeout_s=2)
        assert time.monotonic() - t0 < 10
    else:
        time.sleep(4)


def test_ring_missing_rank_times_out():
    run_distributed(_check_missing_rank, 2, timeout_s=60, final_barrier=False)


def _check_modules(rank: int, world: int) -> None:
    torch.manual_seed(0)
    n_local, n = 10, 10 * world
    attn = RingDilatedAttention([6, 16], [1, 2])
    x = torch.randn(2, n, 4, 8, dtype=torch.float64)
    sl = slice(rank * n_local, (rank + 1) * n_local)
    out = attn(x[:, sl], x[:, sl], x[:, sl], is_causal=True)
    torch.testing.assert_close(out, dilated_attention(x, x, x, [6, 16], [1, 2], is_causal=True)[:, sl], **TOL)
    assert attn.stats.calls == 1 and attn.stats.local_only_calls == 0
    if rank < world - 1:  # causal: rows move to later ranks only
        assert attn.stats.forward_bytes_sent > 0
    mha = RingMultiheadDilatedAttention(16, 4, segment_lengths=[6, 16], dilation_rates=[1, 2], num_kv_heads=2,
                                        dtype=torch.float64)
    from dilated_attention_pytorch import MultiheadDilatedAttention
    single = MultiheadDilatedAttention(16, 4, segment_lengths=[6, 16], dilation_rates=[1, 2], num_kv_heads=2,
                                       dtype=torch.float64)
    single.load_state_dict(mha.state_dict())
    e = torch.randn(2, n, 16, dtype=torch.float64)
    y, _ = mha(e[:, sl], e[:, sl], e[:, sl], is_causal=True)
    y_full, _ = single(e, e, e, is_causal=True)
    torch.testing.assert_close(y, y_full[:, sl], **TOL)
    with pytest.raises(ValueError, match="attention_dropout must be 0"):
        RingDilatedAttention([4], [1], attention_dropout=0.1)


def test_ring_modules():
    run_distributed(_check_modules, 2, timeout_s=60)


def test_ring_needs_process_group():
    """No process group: a ValueError (bad input, SPEC §3) naming what is missing, from every entry point."""
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="ring_dilated_attention needs an initialised torch.distributed process group"):
        ring_dilated_attention(q, q, q, [4], [1])
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        RingDilatedAttention([4], [1])(q, q, q)


def test_fsdp2_example_trains_on_cpu():
    """examples/train_fsdp2.py: two steps under torchrun on CPU (gloo) with FSDP2 and each attention."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers.distributed import free_port

    script = Path(__file__).resolve().parents[2] / "examples" / "train_fsdp2.py"
    losses = {}
    for attention in ("ring", "head_parallel"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), "--steps", "2",
               "--attention", attention, "--seq-len", "256", "--segments", "32", "64", "256"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        losses[attention] = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
        assert len(losses[attention]) == 2, proc.stdout
    # Both strategies compute the same function from the same initial weights.
    values = {k: [float(line.split("loss ")[1].split()[0]) for line in v] for k, v in losses.items()}
    assert values["ring"] == pytest.approx(values["head_parallel"], abs=2e-4), values
