"""Where the fused path's time goes: host time to issue a call, GPU kernel time by kind, wall time.

For each configuration (the issue's w/r, causal, the paper's r) and chunk size it runs the fused
engine and reports, per mode (forward; forward+backward):
- ``wall_ms``: median over repeats, CUDA events around the call;
- ``host_ms``: host time for the call to return, started on an idle GPU (when it is close to
  ``wall_ms`` the call is bound by issuing kernels, not by running them);
- ``gpu_ms`` and its parts: the kernels' own device time from ``torch.profiler`` (attention kernels,
  the Triton gather-merge, everything else), and the number of kernels;
- the ceiling (dense cuDNN SDPA on the shapes the patterns reduce to) timed in the same run.
Prints a table and writes ``fused_profile.json`` (and the top host ops per case) under ``--out``.

    python benchmarks/fused_profile.py --out results/profile --seq-len 65536
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from dilated_attention_pytorch.backends import choose_backend
from dilated_attention_pytorch.bench.cli import BenchConfig, _ceiling
from dilated_attention_pytorch.bench.flops import attended_pairs, useful_flops
from dilated_attention_pytorch.engine import run_engine
from dilated_attention_pytorch.functional import engine_options

SEGMENTS = [2048, 4096, 8192, 16384, 32768]
CASES = {"main": ([1, 2, 4, 8, 16], False), "causal": ([1, 2, 4, 8, 16], True), "paper": ([1, 2, 4, 6, 12], False)}


def _kind(name: str) -> str:
    low = name.lower()
    if "gather_kernel" in low:
        return "gather"
    if any(s in low for s in ("cudnn", "sm90", "flash", "fmha", "xmma")):
        return "attention"
    return "other"


def _profile(fn) -> tuple[dict, list]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    parts, count = {"attention": 0.0, "gather": 0.0, "other": 0.0}, 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            parts[_kind(ev.name)] += ev.device_time / 1e3
            count += 1
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    host_top = [dict(op=e.key, calls=e.count, self_cpu_ms=e.self_cpu_time_total / 1e3) for e in top]
    return dict(gpu_ms=sum(parts.values()), kernels=count, **{f"{k}_ms": v for k, v in parts.items()}), host_top


def _times(fn, repeats: int) -> tuple[float, float]:
    walls, hosts = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        hosts.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        walls.append(start.elapsed_time(end))
    return statistics.median(walls), statistics.median(hosts)


def run_case(case: str, n: int, chunk: int, repeats: int) -> list[dict]:
    dilations, causal = CASES[case]
    b, h, d = 1, 16, 128
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    choice = choose_backend("fused", q, None, 0.0, False)
    opts = engine_options(q, SEGMENTS, dilations, choice, is_causal=causal, scale=d**-0.5, dropout_p=0.0,
                          offsets="paper", head_groups=False)
    if chunk:
        opts = dataclasses.replace(opts, chunk_tokens=chunk)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    g = torch.randn_like(q)

    def fwd() -> None:
        run_engine(q, k, v, None, opts)

    def fwdbwd() -> None:
        for t in (qg, kg, vg):
            t.grad = None
        out, _ = run_engine(qg, kg, vg, None, opts)
        out.backward(g)

    pairs = attended_pairs(n, h, SEGMENTS, dilations, is_causal=causal)
    cfg = BenchConfig(seq_lens=[n], heads=h, head_dim=d, segments=SEGMENTS, dilations=dilations, dtype="bfloat16",
                      causal=causal, warmup=1, repeats=repeats)
    rows = []
    for mode, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        fn()
        fn()
        wall, host = _times(fn, repeats)
        parts, host_top = _profile(fn)
        ceiling_ms, _ = _ceiling(cfg, n, mode == "fwdbwd")
        flops = useful_flops(pairs, d, b, mode == "fwdbwd")
        rows.append(dict(case=case, n=n, chunk=opts.chunk_tokens, mode=mode, wall_ms=wall, host_ms=host, **parts,
                         ceiling_ms=ceiling_ms, vs_ceiling=ceiling_ms / wall, tflops=flops / (wall * 1e-3) / 1e12,
                         host_top=host_top))
    return rows


def gather_sweep(n: int, repeats: int) -> list[dict]:
    """Time the gather-merge alone on one forward's block outputs (the issue's w/r) per tile setting,
    and check each setting's output against the default's."""
    from dilated_attention_pytorch.planning import plan_blocks
    from dilated_attention_pytorch.views import Rows
    from dilated_attention_pytorch.kernels.triton_gather import gather_blocks

    b, h, d = 1, 16, 128
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    choice = choose_backend("fused", q, None, 0.0, False)
    segs, rs = tuple(min(w, n) for w in SEGMENTS), (1, 2, 4, 8, 16)
    blocks = plan_blocks(n, h, h, segs, rs, "paper", False, diagonal_blocks=True)
    outs, lses = [], []
    for block in blocks:
        o, lse, _ = choice.kernel.forward(Rows(block, block.heads).read(q), Rows(block, block.kv_heads).read(k),
                                          Rows(block, block.kv_heads).read(v), key_valid=None, is_causal=False,
                                          scale=d**-0.5, dropout_p=0.0)
        outs.append(o)
        lses.append(lse)
    out, lse_out = torch.empty_like(q), torch.empty(b, n, h, device="cuda")
    bytes_moved = sum(o.numel() * o.element_size() for o in outs) + out.numel() * out.element_size()
    rows, ref = [], None
    for block_t, warps in ((None, 4), (16, 4), (64, 4), (64, 8), (32, 8)):
        fn = lambda: gather_blocks(out, lse_out, blocks, outs, lses, num_heads=h, segments=segs,  # noqa: E731
                                   dilations=rs, block_t=block_t, num_warps=warps)
        fn()
        ref = out.clone() if ref is None else ref
        same = bool(torch.equal(out, ref))
        kernel_ms = statistics.median(_profile(fn)[0]["gather_ms"] for _ in range(5))  # device time, no host gaps
        rows.append(dict(block_t=block_t or "default", num_warps=warps, ms=kernel_ms,
                         tb_per_s=bytes_moved / kernel_ms / 1e9, equal_to_default=same))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--chunks", type=int, nargs="+", default=[0], help="chunk tokens to try (0: the library's)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--label", default="", help="a name for this code version in the output")
    p.add_argument("--gather-sweep", action="store_true", help="also time the gather-merge alone per tile setting")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fused_profile.py needs a CUDA GPU")
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in a.cases:
        for chunk in a.chunks:
            rows += run_case(case, a.seq_len, chunk, a.repeats)
    for r in rows:
        r["label"] = a.label
    sweep = gather_sweep(a.seq_len, a.repeats) if a.gather_sweep else []
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, label=a.label)
    name = f"fused_profile{'-' + a.label if a.label else ''}.json"
    (a.out / name).write_text(json.dumps(dict(meta=meta, rows=rows, gather_sweep=sweep), indent=1))
    for r in sweep:
        print(f"gather-merge alone, BLOCK_T {r['block_t']}, {r['num_warps']} warps: {r['ms']:.3f} ms, "
              f"{r['tb_per_s']:.2f} TB/s of block outputs read + output written; equal to default: {r['equal_to_default']}")
    print("| version | case | chunk | mode | wall ms | host ms | gpu ms | attention | gather | other | kernels "
          "| ceiling ms | × ceiling |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {a.label} | {r['case']} | {r['chunk']} | {r['mode']} | {r['wall_ms']:.2f} | {r['host_ms']:.2f} | "
              f"{r['gpu_ms']:.2f} | {r['attention_ms']:.2f} | {r['gather_ms']:.2f} | {r['other_ms']:.2f} | "
              f"{r['kernels']} | {r['ceiling_ms']:.2f} | {r['vs_ceiling']:.2f} |")


if __name__ == "__main__":
    main()
