"""Packed documents (``cu_seqlens``) against one unpacked sequence of the same length, each against its
dense ceiling.

    python benchmarks/varlen_bench.py                     # one GPU: 256K tokens per row, bf16, fused path
    python benchmarks/varlen_bench.py --smoke             # CPU, tiny sizes, a few seconds

One row of ``--total`` tokens holds documents of random lengths, log-uniform in ``[--min-doc,
--max-doc]`` (the last one cut to fit; ``--seed`` fixes them). For forward and forward+backward it times:

- ``packed``: ``dilated_attention(..., cu_seqlens=cu)`` on the packed row (each document its own sequence);
- ``packed ceiling``: dense SDPA (cuDNN on CUDA) on the shapes the patterns reduce each document to —
  ``ceil(L / W_i)`` sequences of ``ceil(W_i / r_i)`` tokens with ``W_i = min(w_i, L)`` — the same calls
  a varlen dense kernel would make, batched by shape, all in one timed call;
- ``unpacked`` and ``unpacked ceiling``: the same on one sequence of ``--total`` tokens.

Useful TF/s counts attended query-key pairs only (the same pairs for a method and its ceiling), so
``× ceiling`` is the ceiling's time over the method's. The last line is the packed ratio over the
unpacked one (the issue's target: at least 0.8). Prints a GitHub table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dilated_attention_pytorch import dilated_attention
from dilated_attention_pytorch.bench.flops import attended_pairs, useful_flops
from dilated_attention_pytorch.bench.measure import time_calls

GPU = dict(total=262144, min_doc=1024, max_doc=131072, heads=16, head_dim=128, dtype="bfloat16",
           segments=[2048, 4096, 8192, 16384, 32768], dilations=[1, 2, 4, 8, 16], backend="fused")
SMOKE = dict(total=1024, min_doc=32, max_doc=512, heads=2, head_dim=16, dtype="float32",
             segments=[128, 256], dilations=[1, 2], backend="portable")


def document_lengths(total: int, low: int, high: int, rng: random.Random) -> list[int]:
    """Log-uniform lengths in [low, high] until ``total`` tokens; the last one cut to fit."""
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))), high, total - sum(lengths)))
    return lengths


def ceiling_shapes(lengths: list[int], segments, dilations) -> Counter:
    """(tokens per sequence) -> number of sequences: the dense calls each document's patterns reduce to."""
    shapes: Counter = Counter()
    for n in lengths:
        for w, r in zip(segments, dilations):
            seg = min(w, n)
            shapes[math.ceil(seg / r)] += math.ceil(n / seg)
    return shapes


def _sdpa_context(device: torch.device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type == "cuda":
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])


def _step(fns: list[Callable[[], torch.Tensor]], grads: list[Optional[torch.Tensor]], inputs) -> Callable[[], None]:
    def call() -> None:
        for t in inputs:
            t.grad = None
        for fn, g in zip(fns, grads):
            out = fn()
            if g is not None:
                out.backward(g)

    return call


def ceiling_call(shapes: Counter, args, dtype, device, backward: bool) -> Callable[[], None]:
    """Every dense call of ``shapes`` in one callable (inputs made once)."""
    fns, grads, inputs = [], [], []
    for length, batch in sorted(shapes.items()):
        q, k, v = (torch.randn(batch, args.heads, length, args.head_dim, device=device, dtype=dtype,
                               requires_grad=backward) for _ in range(3))
        inputs += [q, k, v]

        def fn(q=q, k=k, v=v):
            with _sdpa_context(device):
                return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

        fns.append(fn)
        grads.append(torch.randn_like(q) if backward else None)
    return _step(fns, grads, inputs)


def dilated_call(lengths: Optional[list[int]], args, dtype, device, backward: bool) -> Callable[[], None]:
    """The packed row (``lengths``: its documents) or, with None, one sequence of ``args.total`` tokens."""
    shape = (args.total, args.heads, args.head_dim) if lengths else (1, args.total, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    kw = dict(is_causal=args.causal, backend=args.backend)
    if lengths:
        kw["cu_seqlens"] = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
        kw["max_seqlen"] = max(lengths)
    fn = lambda: dilated_attention(q, k, v, args.segments, args.dilations, **kw)  # noqa: E731
    return _step([fn], [torch.randn_like(q) if backward else None], (q, k, v))


def pairs_of(lengths: list[int], args) -> int:
    return sum(attended_pairs(n, args.heads, [min(w, n) for w in args.segments], args.dilations,
                              is_causal=args.causal) for n in lengths)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    lengths = document_lengths(args.total, args.min_doc, args.max_doc, random.Random(args.seed))
    rows = []
    for mode in args.modes:
        backward = mode == "fwdbwd"
        for name, docs in (("packed", lengths), ("unpacked", None)):
            seq = docs or [args.total]
            pairs = pairs_of(seq, args)
            timings = {}
            for method, call in ((name, dilated_call(docs, args, dtype, device, backward)),
                                 (f"{name} ceiling", ceiling_call(ceiling_shapes(seq, args.segments, args.dilations),
                                                                  args, dtype, device, backward))):
                t = time_calls(call, device, args.warmup, args.repeats, min_warmup_s=args.min_time / 2,
                               min_time_s=args.min_time)
                timings[method] = t.ms
                tflops = useful_flops(pairs, args.head_dim, 1, backward) / (t.ms * 1e-3) / 1e12
                rows.append(dict(method=method, mode=mode, ms=t.ms, spread_pct=100 * (t.p75 - t.p25) / t.ms,
                                 tflops=tflops, peak_gb=t.peak / 2**30 if t.peak else None))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows[-2]["vs_ceiling"] = timings[f"{name} ceiling"] / timings[name]
    return rows, lengths


def table(rows: list[dict]) -> str:
    lines = ["| mode | method | ms | spread % | useful TF/s | × ceiling | peak GB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        vs = f"{r['vs_ceiling']:.2f}" if r.get("vs_ceiling") else ""
        peak = f"{r['peak_gb']:.2f}" if r["peak_gb"] else ""
        lines.append(f"| {r['mode']} | {r['method']} | {r['ms']:.2f} | {r['spread_pct']:.1f} | {r['tflops']:.3g} "
                     f"| {vs} | {peak} |")
    for mode in sorted({r["mode"] for r in rows}):
        ratio = {r["method"]: r["vs_ceiling"] for r in rows if r["mode"] == mode and r.get("vs_ceiling")}
        lines.append(f"\n{mode}: packed × ceiling / unpacked × ceiling = {ratio['packed'] / ratio['unpacked']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (a smoke test)")
    p.add_argument("--total", type=int)
    p.add_argument("--min-doc", type=int)
    p.add_argument("--max-doc", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--dtype")
    p.add_argument("--segments", type=int, nargs="+")
    p.add_argument("--dilations", type=int, nargs="+")
    p.add_argument("--backend", help="fused on CUDA by default, portable with --smoke")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--seed", type=int, default=0, help="document lengths")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per method (at least)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="write the rows and document lengths as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.warmup, args.repeats, args.min_time = "cpu", 1, 2, 0.0
    for key, value in (SMOKE if args.smoke else GPU).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.backend == "fused" and args.device != "cuda":
        p.error("the fused backend needs CUDA: pass --smoke or --backend portable on CPU")
    rows, lengths = run(args)
    print(f"documents ({len(lengths)}): {lengths}")
    print(f"total={args.total} heads={args.heads} head_dim={args.head_dim} dtype={args.dtype} backend={args.backend} "
          f"segments={args.segments} dilations={args.dilations} causal={args.causal}")
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(config={k: v for k, v in vars(args).items() if k != "out"},
                                            lengths=lengths, rows=rows), indent=1, default=str))


if __name__ == "__main__":
    main()
