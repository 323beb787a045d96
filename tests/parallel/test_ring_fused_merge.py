"""The ring's fused-path program on real gloo ranks: no core, the whole shard one program whose partial
results the Triton gather kernel merges (here in Triton's interpreter, conftest sets ``TRITON_INTERPRET=1``)
— segments that began on an earlier rank (a phase), whole segments, segments cut at the shard's end, and
the received rows' partial results of the same rows. The block kernel is the CPU one; the merge placement
is what is checked: every rank's output, LSE and gradients equal single-device ``dilated_attention``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dilated_attention_pytorch.backends import choose_backend
from dilated_attention_pytorch.functional import attention_args
from dilated_attention_pytorch.parallel.ring import _BACKENDS, _RingExchange, ring_shard
from dilated_attention_pytorch.parallel.ring_plan import ring_plan

from tests.helpers.distributed import _loss, _single_device, case, case_inputs, random_cases, run_distributed
from tests.parallel.test_longnet_schedule import longnet_schedule

TOL32 = dict(rtol=2e-5, atol=2e-5)

CASES = [
    case(n_local=13, segs=(8, 16, 32), dils=(1, 2, 4)),  # phases, whole segments and cut ones
    case(n_local=13, segs=(8, 16, 32), dils=(1, 2, 4), causal=True, lse=True),
    case(n_local=11, segs=(6, 10), dils=(4, 3), causal=True, h=4, h_kv=2),  # r does not divide W, GQA
    case(segs=(7, 24), dils=(2, 5), mask=True, lse=True),  # key padding mask (some rows see no key)
    case(n_local=7, segs=(3,) + longnet_schedule(3, 28)[0][1:], dils=longnet_schedule(3, 28)[1], h=6, h_kv=3,
         offsets="torchscale", causal=True),  # the LongNet schedule: the largest segment is the sequence
    # 'paper' offsets with h <= r: a spanning segment's offsets run as one diagonal block and one call
    # on the received rows (its heads' keys from different transfers)
    case(n_local=16, segs=(4, 16, 64), dils=(1, 4, 16), h=4, h_kv=4, b=1),
    case(n_local=16, segs=(4, 16, 64), dils=(1, 4, 16), h=4, h_kv=4, causal=True, lse=True),
    # h > r: diagonal blocks of r heads each, segments straddling shard edges, the sequence's short last
    # segment on the last rank
    case(n_local=12, segs=(8, 16), dils=(2, 4), h=8, h_kv=8, b=1),
    case(n_local=12, segs=(8, 16), dils=(2, 4), h=8, h_kv=8, b=1, causal=True),
]


def _fused_shard(c, rank, world, group, q, k, v, mask):
    """This rank's ring work with the fused program (the gather merge), on the CPU block kernel."""
    args = attention_args(q, k, v, c["segs"], c["dils"], is_causal=c["causal"], scale=None, dropout_p=0.0,
                          offsets=c["offsets"], head_groups=c["head_groups"], key_padding_mask=mask,
                          return_lse=True, backend="portable", backends=_BACKENDS)
    choice = dataclasses.replace(choose_backend("portable", q, mask, 0.0, c["lse"]), backend="fused")
    plan = ring_plan(world, rank, c["n_local"], c["h"], c["h_kv"], args.segment_lengths, args.dilation_rates,
                     args.offsets, args.head_groups, args.is_causal, with_core=False,
                     diagonal_blocks=mask is None)
    assert plan.core[0] == plan.core[1]
    if plan.local_only:
        return None
    return ring_shard(q, k, v, mask, args, choice, plan, _RingExchange(plan, group, None, 60.0))


def test_spanning_offsets_combine_into_one_diagonal_call():
    plan = ring_plan(4, 2, 16, 4, 4, (4, 16, 64), (1, 4, 16), "paper", False, False, with_core=False,
                     diagonal_blocks=True)
    assert len(plan.remote_calls) == 1 and len(plan.remote_calls[0].keys) == 4
    assert plan.remote_calls[0].q_rows.diag_m == 0
    assert len({idx for idx, _ in plan.remote_calls[0].keys}) == 4  # each head its own offset's rows


def _check(rank: int, world: int, cases, seed: int) -> None:
    import torch.distributed as dist

    ran = 0
    for i, c in enumerate(cases):
        c = dict(c, n_total=c["n_local"] * world)
        q, k, v, dout, dlse, mask = (None if t is None else (t.float() if t.is_floating_point() else t)
                                     for t in case_inputs(c, seed=seed + i))
        out_w, lse_w, grads_w = _single_device(c, q.double(), k.double(), v.double(), dout.double(), dlse.double(),
                                               mask, "auto")
        sl = slice(rank * c["n_local"], (rank + 1) * c["n_local"])
        shard = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
        res = _fused_shard(c, rank, world, dist.group.WORLD, *shard, None if mask is None else mask[:, sl])
        if res is None:
            continue
        ran += 1
        out, lse = res
        _loss(out, lse if c["lse"] else None, dout[:, sl], dlse[:, :, sl]).backward()
        where = f"case {i} {c} (input seed {seed + i}) rank {rank}"
        torch.testing.assert_close(out, out_w[:, sl].float(), **TOL32, msg=lambda m: f"{where} out: {m}")
        torch.testing.assert_close(lse, lse_w[:, :, sl].float(), **TOL32, msg=lambda m: f"{where} lse: {m}")
        for t, gw, name in zip(shard, grads_w, "qkv"):
            torch.testing.assert_close(t.grad, gw[:, sl].float(), **TOL32, msg=lambda m: f"{where} d{name}: {m}")
    assert ran >= len(CASES) - 1, ran  # the fixed cases cross shard boundaries


@pytest.mark.parametrize("world", [2, 4])
def test_fused_ring_program_matches_single_device(world):
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh configurations and inputs every run
    cases = CASES + random_cases(seed, 4 if world == 2 else 2, world)
    run_distributed(_check, world, cases, seed, timeout_s=240)
