"""Head-parallel (all-to-all) dilated attention on real gloo process groups: every rank's shard of the
output and gradients equals single-device ``dilated_attention`` on the whole sequence and the float64
reference."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import MultiheadDilatedAttention, dilated_attention
from dilated_attention_pytorch.parallel.comm import CommStats
from dilated_attention_pytorch.parallel.head_parallel import (
    DistributedImprovedDilatedAttention, DistributedImprovedMultiheadDilatedAttention,
    head_parallel_dilated_attention,
)

from tests.helpers.distributed import TOL, case, check_sharded, random_cases, run_distributed

CASES = {
    2: [
        case(),
        case(causal=True, n_local=13, segs=(8, 16, 32), dils=(1, 2, 4)),
        case(h=4, h_kv=2, offsets="torchscale", causal=True),  # GQA kept: one kv head per rank
        case(h=6, h_kv=1, segs=(5, 9, 24), dils=(1, 2, 3), offsets="group"),  # kv heads repeated (1 % 2 != 0)
        case(h=6, h_kv=3, segs=(5, 9, 24), dils=(1, 2, 3), head_groups=True, causal=True),  # runs cut groups
        case(h=4, offsets=[[0, 0, 0, 0], [1, 0, 1, 1]], causal=True),  # explicit offsets, global head index
        case(segs=(7, 24), dils=(2, 5), mask=True, causal=True, lse=True),
        case(h=8, h_kv=4, n_local=9, segs=(4, 30), dils=(2, 3), head_groups=True, lse=True),
    ],
    4: [
        case(n_local=7, segs=(5, 12, 40), dils=(1, 3, 5), causal=True, h_kv=2),  # kv heads repeated (2 % 4)
        case(n_local=5, h=8, h_kv=4, segs=(8, 13), dils=(2, 3), offsets="torchscale", mask=True, lse=True),
        case(n_local=6, h=8, segs=(3, 6, 24), dils=(1, 2, 3), head_groups=True, causal=True),
    ],
}


@pytest.mark.parametrize("world", [2, 4])
def test_head_parallel_matches_single_device_and_reference(world):
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh configurations and inputs every run
    cases = CASES[world] + random_cases(seed, 4, world, head_multiple=world)
    run_distributed(check_sharded, world, cases, "head_parallel", seed, timeout_s=150)


def _check_errors_and_modules(rank: int, world: int) -> None:
    q = torch.randn(1, 8, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"multiple of the world size.*heads=3 on world=2"):
        head_parallel_dilated_attention(q, q, q, [4], [1])
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    bad = torch.randn(1, 8, 2, 8 if rank == 0 else 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"head_dim.*\[8, 4\]"):
        head_parallel_dilated_attention(bad, bad, bad, [4], [1])
    with pytest.raises(ValueError, match="dropout_p"):
        head_parallel_dilated_attention(q, q, q, [4], [1], dropout_p=0.1 * rank)

    # Bytes: q, k, v and out each send (P-1)/P of the shard, forward and backward.
    stats = CommStats()
    x = q.clone().requires_grad_()
    head_parallel_dilated_attention(x, x, x, [4], [1], stats=stats).sum().backward()
    assert stats.forward_bytes_sent == 4 * q.numel() * 8 // 2 == stats.backward_bytes_sent

    # Modules: shard in, shard out, equal to the single-device module on the whole sequence.
    torch.manual_seed(0)
    n_local, n = 10, 10 * world
    sl = slice(rank * n_local, (rank + 1) * n_local)
    e = torch.randn(2, n, 16, dtype=torch.float64)
    mha = DistributedImprovedMultiheadDilatedAttention(
        16, 4, segment_lengths=[6, 16], dilation_rates=[1, 2], num_kv_heads=2, dtype=torch.float64,
    )
    single = mha.to_multihead()  # the single-device module with the same weights
    assert isinstance(single, MultiheadDilatedAttention)
    y, _ = mha(e[:, sl], e[:, sl], e[:, sl], is_causal=True)
    torch.testing.assert_close(y, single(e, e, e, is_causal=True)[0][:, sl], **TOL)
    assert mha.stats.calls == 1

    # Dropout runs in training (each rank its own heads' masks) and is off in eval.
    attn = DistributedImprovedDilatedAttention([6, 16], [1, 2], attention_dropout=0.5)
    xq = torch.randn(2, n, 4, 8, dtype=torch.float64)
    ref = dilated_attention(xq, xq, xq, [6, 16], [1, 2])[:, sl]
    attn.eval()
    torch.testing.assert_close(attn(xq[:, sl], xq[:, sl], xq[:, sl]), ref, **TOL)
    attn.train()
    dropped = attn(xq[:, sl], xq[:, sl], xq[:, sl])
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, ref)
    with pytest.raises(ValueError, match="backend"):
        head_parallel_dilated_attention(q, q, q, [4], [1], backend="nope")


def test_head_parallel_errors_bytes_and_modules():
    run_distributed(_check_errors_and_modules, 2, timeout_s=90)
