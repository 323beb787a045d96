"""Sequence-parallel dilated attention on GPUs: exactness, bytes sent per rank, weak scaling.

    torchrun --nproc_per_node=2 benchmarks/ring_scaling.py --out results/ring_scaling   # 2 GPUs, NCCL
    torchrun --nproc_per_node=1 benchmarks/ring_scaling.py --out results/ring_scaling_1gpu  # baseline run
    torchrun --nproc_per_node=2 benchmarks/ring_scaling.py --device cpu --quick --out /tmp/rs  # CPU smoke

Sections (rank 0 writes ``<out>/ring_scaling_w<world>.json`` after each one, so a late failure keeps
the earlier results; they run in the order 2, 3 (aligned), 1, 3 (unaligned)):

1. exactness: at a small size whose segments cross shard boundaries, every rank's shard of the ring and
   head-parallel outputs and gradients vs single-device ``dilated_attention`` on the whole sequence
   (fp32: max abs error; bf16: error vs an fp32 single-device reference, next to the single-device bf16
   error on the same inputs);
2. bytes sent per rank (forward + backward, measured by ``CommStats``) at the scaling sizes, and from the
   plan for growing lengths: flat in the total length for fixed w/r;
3. weak scaling, fwd+bwd bf16, h=16, d=128, w=[2048..32768], r=[1..16]: 1 GPU on ``n_local`` tokens
   (single-device ``dilated_attention``, run on every GPU at once) vs ``world`` GPUs on ``world·n_local``
   tokens (ring; head-parallel), at n_local = 256K and 1M; plus a ring run whose shard length is not
   a multiple of the segments (every pattern has segments crossing the boundary: communication).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dilated_attention_pytorch import dilated_attention, explain_backend
from dilated_attention_pytorch.parallel import (
    CommStats, head_parallel_dilated_attention, ring_dilated_attention, ring_plan,
)

SEGMENTS = [2048, 4096, 8192, 16384, 32768]
DILATIONS = [1, 2, 4, 8, 16]
HEADS, HEAD_DIM = 16, 128


def _init(device_type: str) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain `python benchmarks/ring_scaling.py`: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=300))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    return dist.get_rank(), dist.get_world_size(), device


def _nccl_version() -> str:
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rand(shape, device, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def _err(x, ref):
    x, ref = x.double(), ref.double()
    return {"max_abs": (x - ref).abs().max().item(), "rel_l2": ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()}


def exactness(rank, world, device, n_local, causal, dtype, seed=0):
    """Ring and head-parallel shards vs single-device on the whole sequence (and an fp32 reference)."""
    b, n = 1, world * n_local
    h_kv = 4  # GQA: 4 query heads per key/value head
    q = _rand((b, n, HEADS, HEAD_DIM), device, torch.float32, seed)
    k = _rand((b, n, h_kv, HEAD_DIM), device, torch.float32, seed + 1)
    v = _rand((b, n, h_kv, HEAD_DIM), device, torch.float32, seed + 2)
    dout = _rand((b, n, HEADS, HEAD_DIM), device, torch.float32, seed + 3)
    sl = slice(rank * n_local, (rank + 1) * n_local)

    def run(fn, leaves, grad_out, **kw):
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        out = fn(*leaves, SEGMENTS, DILATIONS, is_causal=causal, **kw)
        (out.float() * grad_out).sum().backward()
        return [out.detach().float()] + [t.grad.float() for t in leaves]

    ref32 = [t[:, sl] for t in run(dilated_attention, (q, k, v), dout)]  # fp32 single-device on the whole
    lo = [t.to(dtype) for t in (q, k, v)]
    single = [t[:, sl] for t in run(dilated_attention, lo, dout)] if dtype != torch.float32 else ref32
    result = {"dtype": str(dtype), "causal": causal, "n_total": n, "n_local": n_local}
    for name, fn in (("ring", ring_dilated_attention), ("head_parallel", head_parallel_dilated_attention)):
        stats = CommStats()
        shard = run(fn, [t[:, sl] for t in lo], dout[:, sl], stats=stats)
        result[name] = {
            "vs_single_device": {g: _err(a, s) for g, a, s in zip(("out", "dq", "dk", "dv"), shard, single)},
            "vs_fp32_reference": {g: _err(a, r) for g, a, r in zip(("out", "dq", "dk", "dv"), shard, ref32)},
            "bytes_sent": stats.bytes_sent,
        }
    if dtype != torch.float32:
        result["single_device_vs_fp32_reference"] = {
            g: _err(a, r) for g, a, r in zip(("out", "dq", "dk", "dv"), single, ref32)
        }
    return result


def _time_fwd_bwd(fn, q, k, v, dout, iters, warmup, device, **kw):
    """Median seconds of forward+backward, max over ranks."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    times = []
    for i in range(warmup + iters):
        for t in leaves:
            t.grad = None
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        out = fn(*leaves, **kw)
        out.backward(dout)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        del out
    times.sort()
    med = torch.tensor([times[len(times) // 2]], dtype=torch.float64, device=device)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return med.item()


def _per_rank_bytes(stats: CommStats, device) -> dict:
    """Forward and backward bytes each rank sent per call (one layer), as lists indexed by rank."""
    calls = max(1, stats.calls)
    mine = torch.tensor([stats.forward_bytes_sent // calls, stats.backward_bytes_sent // calls],
                        dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return {"forward": [int(t[0]) for t in every], "backward": [int(t[1]) for t in every]}


def weak_scaling(rank, world, device, n_local, dtype, iters, warmup, causal, segs, dils, tag):
    b = 1
    q = _rand((b, n_local, HEADS, HEAD_DIM), device, dtype, 10 + rank)
    k = _rand((b, n_local, HEADS, HEAD_DIM), device, dtype, 20 + rank)
    v = _rand((b, n_local, HEADS, HEAD_DIM), device, dtype, 30 + rank)
    dout = _rand((b, n_local, HEADS, HEAD_DIM), device, dtype, 40 + rank)
    common = dict(segment_lengths=segs, dilation_rates=dils, is_causal=causal)
    res = {"tag": tag, "n_local": n_local, "n_total": world * n_local, "causal": causal, "segments": segs,
           "dilations": dils, "dtype": str(dtype),
           "single_device_backend": str(explain_backend(q))}
    res["t_1gpu_s"] = _time_fwd_bwd(dilated_attention, q, k, v, dout, iters, warmup, device, **common)
    stats = CommStats()
    res["t_ring_s"] = _time_fwd_bwd(ring_dilated_attention, q, k, v, dout, iters, warmup, device, stats=stats, **common)
    res["ring_bytes_sent_per_rank_per_layer"] = _per_rank_bytes(stats, device)
    res["ring_local_only"] = stats.local_only_calls == stats.calls
    res["ring_ratio"] = res["t_ring_s"] / res["t_1gpu_s"]
    if HEADS % world == 0:
        hp = CommStats()
        res["t_head_parallel_s"] = _time_fwd_bwd(
            head_parallel_dilated_attention, q, k, v, dout, iters, warmup, device, stats=hp, **common
        )
        res["head_parallel_bytes_sent_per_rank_per_layer"] = _per_rank_bytes(hp, device)
        res["head_parallel_ratio"] = res["t_head_parallel_s"] / res["t_1gpu_s"]
    del q, k, v, dout
    if device.type == "cuda":
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.empty_cache()
    return res


def plan_bytes(world, segs, dils, n_locals, causal):
    """Forward bytes each rank sends (bf16, b=1, h=16, d=128) from the plan, for growing lengths."""
    rows = []
    for n_local in n_locals:
        sent = [ring_plan(world, r, n_local, HEADS, HEADS, segs, dils, "paper", False, causal)
                .forward_bytes_sent(1, HEAD_DIM, 2) for r in range(world)]
        rows.append({"n_local": n_local, "n_total": world * n_local, "max_forward_bytes_per_rank": max(sent)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the JSON results")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, e.g. on CPU)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=320.0, help="skip remaining sections after this long")
    args = p.parse_args()
    t_start = time.perf_counter()
    rank, world, device = _init(args.device)
    out_dir = Path(args.out)
    path = out_dir / f"ring_scaling_w{world}.json"
    report = {
        "world": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "backend": str(dist.get_backend()),
        "nccl": _nccl_version() if device.type == "cuda" else None,
        "config": {"heads": HEADS, "head_dim": HEAD_DIM, "segments": SEGMENTS, "dilations": DILATIONS},
        "exactness": [], "plan_bytes": {}, "weak_scaling": [], "skipped": [],
    }

    def save():
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))

    def over_budget(what):
        late = torch.tensor([time.perf_counter() - t_start > args.budget_s], dtype=torch.int32, device=device)
        dist.all_reduce(late, op=dist.ReduceOp.MAX)
        if late.item():
            report["skipped"].append(what)
            save()
        return bool(late.item())

    # Order: the plan (pure index math), then weak scaling at the sizes (every segment inside a
    # shard: single-device path, no communication), then exactness and the runs with segments crossing
    # shard boundaries (the communicating path). Results are saved after each step.
    for w in sorted({2, 4, 8, max(2, world)}):
        report["plan_bytes"][f"world{w}_aligned"] = plan_bytes(
            w, SEGMENTS, DILATIONS, [1 << 18, 1 << 20, 1 << 22], True
        )
        report["plan_bytes"][f"world{w}_unaligned"] = plan_bytes(
            w, SEGMENTS, DILATIONS, [(1 << 18) - 1024, (1 << 20) - 1024, (1 << 22) - 1024], True
        )
    save()

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    segs, dils = (SEGMENTS, DILATIONS) if not args.quick else ([64, 128, 256], [1, 2, 4])
    sizes = [(1 << 18, "256K"), (1 << 20, "1M")] if not args.quick else [(1024, "1K"), (2048, "2K")]
    unaligned = (1 << 18) - 1024 if not args.quick else 1024 - 32

    def scaling(n_local, tag, causal):
        if over_budget(tag):
            return
        res = weak_scaling(rank, world, device, n_local, dtype, args.iters, args.warmup, causal, segs, dils, tag)
        report["weak_scaling"].append(res)
        save()
        if rank == 0:
            hp = f", head-parallel {res['t_head_parallel_s']:.3f} s ({res['head_parallel_ratio']:.2f}x)" \
                if "t_head_parallel_s" in res else ""
            print(f"{tag}: 1 GPU {res['t_1gpu_s']:.3f} s, ring on {world} {res['t_ring_s']:.3f} s "
                  f"({res['ring_ratio']:.2f}x, {res['ring_bytes_sent_per_rank_per_layer']} B/rank){hp}", flush=True)

    for n_local, name in sizes:
        scaling(n_local, f"{name} per GPU, causal", True)
    scaling(sizes[0][0], f"{sizes[0][1]} per GPU, non-causal", False)

    n_small = 700 if args.quick else 3000
    for dtype_x in ((torch.float32,) if args.device == "cpu" else (torch.float32, torch.bfloat16)):
        for causal in (False, True):
            if over_budget(f"exactness {dtype_x} causal={causal}"):
                continue
            report["exactness"].append(exactness(rank, world, device, n_small, causal, dtype_x))
            save()
            if rank == 0:
                r = report["exactness"][-1]
                ring_err = r["ring"]["vs_single_device"]["out"]["rel_l2"]
                hp_err = r["head_parallel"]["vs_single_device"]["out"]["rel_l2"]
                print(f"exactness {dtype_x} causal={causal}: ring out rel {ring_err:.2e}, "
                      f"head-parallel out rel {hp_err:.2e}", flush=True)

    scaling(unaligned, f"{unaligned} per GPU (segments cross the shard boundary), causal", True)
    scaling(unaligned, f"{unaligned} per GPU (segments cross the shard boundary), non-causal", False)
    report["elapsed_s"] = time.perf_counter() - t_start
    save()
    if rank == 0:
        print(f"wrote {path} in {report['elapsed_s']:.0f} s", flush=True)
    dist.barrier()  # no rank tears its groups down while another still exchanges
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
