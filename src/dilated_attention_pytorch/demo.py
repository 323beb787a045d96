"""A short demo: dilated attention on random data, checked against the dense reference, and timed."""

from __future__ import annotations

import argparse
import time

import torch

from .functional import dilated_attention
from .backends import explain_backend

__all__ = ["main"]


def _time(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dilated_attention_pytorch demo", description=__doc__)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--segments", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--dilations", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = (1, args.seq, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    run = lambda: dilated_attention(q, k, v, args.segments, args.dilations, is_causal=args.causal)  # noqa: E731
    ms = _time(run, repeats=5)

    n_check = min(args.seq, 1024)
    qs, ks, vs = (t[:, :n_check] for t in (q, k, v))
    out = dilated_attention(qs, ks, vs, args.segments, args.dilations, is_causal=args.causal)
    ref = dilated_attention(qs, ks, vs, args.segments, args.dilations, is_causal=args.causal, backend="reference")
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()

    print(f"dilated attention  b=1 n={args.seq} h={args.heads} d={args.head_dim} {args.dtype} on {device}")
    print(f"patterns           w={args.segments} r={args.dilations} causal={args.causal}")
    print(f"backend            {explain_backend(q)}")
    print(f"forward time       {ms:.2f} ms")
    print(f"rel. error vs float64 reference (first {n_check} tokens): {err:.2e}")
