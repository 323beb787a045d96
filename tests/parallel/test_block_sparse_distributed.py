"""BlockSparseRingDistributedDilatedAttention on real gloo process groups (2 ranks, CPU)."""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dilated_attention_pytorch.block_sparse import (
    BlockSparseRingDistributedDilatedAttention,
    SparsePatternConfig,
    block_sparse_attention,
)

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [  # (config, is_causal, h, h_kv)
    (SparsePatternConfig("local", window=1), True, 4, 2),
    (SparsePatternConfig("random", density=0.3, seed=3), False, 2, 2),
    (SparsePatternConfig("dilated"), True, 2, 1),
]


def worker(rank: int, port: int, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        b, n, bs, d = 2, 64, 4, 8
        local = n // WORLD
        for ci, (cfg, causal, h, h_kv) in enumerate(CASES):
            gen = torch.Generator().manual_seed(ci)  # same full inputs on every rank
            q, k, v = (torch.randn(b, n, heads, d, generator=gen, dtype=torch.float64) for heads in (h, h_kv, h_kv))
            g = torch.randn(b, n, h, d, generator=gen, dtype=torch.float64)
            module = BlockSparseRingDistributedDilatedAttention([16, 32], [1, 2], sparse_config=cfg, block_size=bs)
            layout = module.layout(n, h, torch.device("cpu"), is_causal=causal)
            # single-device result on the whole sequence
            qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
            full = block_sparse_attention(qf, kf, vf, layout, block_size=bs, is_causal=causal)
            (full * g).sum().backward()
            # sharded
            sl = slice(rank * local, (rank + 1) * local)
            qs, ks, vs = (x[:, sl].clone().requires_grad_() for x in (q, k, v))
            out = module(qs, ks, vs, is_causal=causal)
            (out * g[:, sl]).sum().backward()
            torch.testing.assert_close(out, full[:, sl], atol=1e-12, rtol=1e-10)
            for mine, ref in ((qs.grad, qf.grad), (ks.grad, kf.grad), (vs.grad, vf.grad)):
                torch.testing.assert_close(mine, ref[:, sl], atol=1e-11, rtol=1e-9)
            # only the needed remote blocks travelled
            m = local // bs
            rows = layout.expand(h, -1, -1)[:, rank * m : (rank + 1) * m].any(0)
            if causal:
                rows &= torch.arange(n // bs)[None, :] <= torch.arange(rank * m, (rank + 1) * m)[:, None]
            needed_remote = [j for j in rows.any(0).nonzero().flatten().tolist() if j // m != rank]
            assert module.last_fetched_blocks == len(needed_remote), (module.last_fetched_blocks, needed_remote)
            if cfg.pattern == "local" and rank == 0:
                assert module.last_fetched_blocks == 0  # causal local window: rank 0 needs nothing remote
        module = BlockSparseRingDistributedDilatedAttention([16], [1], block_size=bs)
        q = torch.randn(1, 6, 2, 4)
        try:  # checked before any collective, so both ranks raise alike
            module(q, q, q)
            raise AssertionError("a shard that is not a multiple of block_size was accepted")
        except ValueError as err:
            assert "multiple of block_size=4" in str(err)
        with open(os.path.join(result_dir, f"ok{rank}"), "w") as f:
            f.write("ok")
        dist.barrier()  # neither rank tears its group down while the other still talks to it (gloo aborts)
    finally:
        dist.destroy_process_group()


def test_sharded_equals_single_device_forward_and_backward():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(free_port(), tmp), nprocs=WORLD, join=True)
        assert sorted(os.listdir(tmp)) == ["ok0", "ok1"]
