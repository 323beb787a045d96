"""Run a function on a real gloo process group of N CPU processes, with a hard time limit; check
sharded attention against single-device ``dilated_attention`` and the float64 reference."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dilated_attention_pytorch import dilated_attention
from dilated_attention_pytorch.parallel.comm import CommStats
from dilated_attention_pytorch.parallel.head_parallel import head_parallel_dilated_attention
from dilated_attention_pytorch.parallel.ring import ring_dilated_attention
from dilated_attention_pytorch.parallel.ring_plan import ring_plan

TOL = dict(rtol=1e-10, atol=1e-10)
_FUNCTIONS = {"ring": ring_dilated_attention, "head_parallel": head_parallel_dilated_attention}


def case(**kw):
    base = dict(b=2, n_local=12, h=4, h_kv=4, d=8, segs=(8, 16), dils=(1, 2), causal=False, offsets="paper",
                head_groups=False, mask=False, lse=False, spanning=True)
    base.update(kw)
    return base


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, pg_timeout_s: float, final_barrier: bool, args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout_s)
    )
    try:
        fn(rank, world, *args)
        if final_barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn, world: int, *args, timeout_s: float = 120.0, pg_timeout_s: float = 60.0, final_barrier: bool = True
) -> None:
    """Spawn ``world`` processes running ``fn(rank, world, *args)`` in one gloo group.

    A failure on any rank fails the caller with that rank's traceback; if the group does not finish
    within ``timeout_s`` seconds, every process is killed and the caller fails (never a hang).
    """
    ctx = mp.start_processes(
        _entry, args=(fn, world, free_port(), pg_timeout_s, final_barrier, args), nprocs=world, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed test did not finish within {timeout_s} s (killed)")


def case_inputs(c, seed):
    g = torch.Generator().manual_seed(seed)
    n = c["n_total"]
    q = torch.randn(c["b"], n, c["h"], c["d"], generator=g, dtype=torch.float64)
    k = torch.randn(c["b"], n, c["h_kv"], c["d"], generator=g, dtype=torch.float64)
    v = torch.randn(c["b"], n, c["h_kv"], c["d"], generator=g, dtype=torch.float64)
    dout = torch.randn(c["b"], n, c["h"], c["d"], generator=g, dtype=torch.float64)
    dlse = torch.randn(c["b"], c["h"], n, generator=g, dtype=torch.float64)
    mask = None
    if c["mask"]:
        mask = torch.rand(c["b"], n, generator=g) < 0.4
        mask[0, : min(n, 9)] = True  # leading padding: causal rows that see no key at all
        mask[-1, -1] = False
    return q, k, v, dout, dlse, mask


def _loss(out, lse, dout, dlse):
    loss = (out * dout).sum()
    if lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * dlse).sum()
    return loss


def _single_device(c, q, k, v, dout, dlse, mask, backend):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    res = dilated_attention(
        *leaves, c["segs"], c["dils"], is_causal=c["causal"], offsets=c["offsets"], head_groups=c["head_groups"],
        key_padding_mask=mask, return_lse=True, backend=backend,
    )
    out, lse = res
    _loss(out, lse if c["lse"] else None, dout, dlse).backward()
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def random_cases(seed: int, count: int, world: int, head_multiple: int = 1) -> list[dict]:
    """Random small configurations: any n_local, segments shorter and longer than a shard, GQA, rules."""
    import random

    rnd = random.Random(seed)
    cases = []
    for _ in range(count):
        h_kv = rnd.choice([1, 2, 3])
        h = h_kv * rnd.choice([1, 2])
        h = h * head_multiple if h % head_multiple else h
        k = rnd.randint(1, 3)
        segs = [rnd.randint(1, 3 * 10 * world // 2) for _ in range(k)]
        dils = [rnd.randint(1, min(w, 6)) for w in segs]
        cases.append(case(
            b=rnd.choice([1, 2]), n_local=rnd.randint(1, 10), h=h, h_kv=h_kv, d=rnd.choice([4, 8]), segs=tuple(segs),
            dils=tuple(dils), causal=rnd.random() < 0.5, offsets=rnd.choice(["paper", "torchscale", "group"]),
            head_groups=rnd.random() < 0.3 and h >= k, mask=rnd.random() < 0.3, lse=rnd.random() < 0.3, spanning=None,
        ))
    return cases


def check_sharded(rank: int, world: int, cases, fn_name: str, seed: int = 1000) -> None:
    """Every case: this rank's shard of fn's output, LSE and gradients vs single-device and reference."""
    fn = _FUNCTIONS[fn_name]
    for i, c in enumerate(cases):
        c = dict(c, n_total=c["n_local"] * world)
        q, k, v, dout, dlse, mask = case_inputs(c, seed=seed + i)
        whole = _single_device(c, q, k, v, dout, dlse, mask, "auto")
        ref = _single_device(c, q, k, v, dout, dlse, mask, "reference")
        sl = slice(rank * c["n_local"], (rank + 1) * c["n_local"])
        shard = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
        stats = CommStats()
        res = fn(
            *shard, c["segs"], c["dils"], is_causal=c["causal"], offsets=c["offsets"],
            head_groups=c["head_groups"], key_padding_mask=None if mask is None else mask[:, sl],
            return_lse=c["lse"], stats=stats,
        )
        out, lse = res if c["lse"] else (res, None)
        _loss(out, lse, dout[:, sl], dlse[:, :, sl]).backward()
        if fn_name == "ring" and c["spanning"] is not None:
            assert (stats.local_only_calls == 0) == c["spanning"], (i, c, stats)
        for name, (o_whole, l_whole, g_whole) in (("single-device", whole), ("reference", ref)):
            where = f"case {i} {c} (input seed {seed + i}) rank {rank} vs {name}"
            torch.testing.assert_close(out, o_whole[:, sl], **TOL, msg=lambda m: f"{where} out: {m}")
            if lse is not None:
                torch.testing.assert_close(lse, l_whole[:, :, sl], **TOL, msg=lambda m: f"{where} lse: {m}")
            for t, gw, nm in zip(shard, g_whole, "qkv"):
                torch.testing.assert_close(t.grad, gw[:, sl], **TOL, msg=lambda m: f"{where} d{nm}: {m}")


def check_bytes_flat(rank: int, world: int, segs, dils, n_locals, **shape) -> None:
    """Causal ring bytes sent per rank equal the plan and do not change over ``n_locals`` (which differ by
    multiples of lcm(segs), so every shard boundary falls at the same place in its segments)."""
    sent = {}
    for n_local in n_locals:
        c = case(n_local=n_local, segs=segs, dils=dils, causal=True, n_total=n_local * world, **shape)
        q, k, v, dout, _, _ = case_inputs(c, seed=7)
        sl = slice(rank * n_local, (rank + 1) * n_local)
        shard = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
        stats = CommStats()
        (ring_dilated_attention(*shard, segs, dils, is_causal=True, stats=stats) * dout[:, sl]).sum().backward()
        plan = ring_plan(world, rank, n_local, c["h"], c["h_kv"], segs, dils, "paper", False, True)
        assert stats.forward_bytes_sent == plan.forward_bytes_sent(c["b"], c["d"], 8)
        sent[n_local] = (stats.forward_bytes_sent, stats.backward_bytes_sent)
    assert len(set(sent.values())) == 1, sent
    if rank < world - 1:
        assert sent[n_locals[0]][0] > 0  # causal: every rank but the last sends rows forward
