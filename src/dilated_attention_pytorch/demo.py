"""A short demo: dilated attention on random data, checked against the dense reference, and timed."""

from __future__ import annotations

import argparse

import torch

from . import _cli
from .bench.measure import measure
from .functional import dilated_attention
from .backends import explain_backend

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    gpu = torch.cuda.is_available()
    p = _cli.parser("demo", __doc__)
    p.add_argument("--seq", type=_cli.positive_int, default=4096, help="sequence length (tokens)")
    p.add_argument("--heads", type=_cli.positive_int, default=8, help="attention heads")
    p.add_argument("--head-dim", type=_cli.positive_int, default=64, help="dimension of each head")
    p.add_argument("--segments", type=_cli.positive_int, nargs="+", default=[512, 1024, 2048],
                   help="segment length w of each pattern")
    p.add_argument("--dilations", type=_cli.positive_int, nargs="+", default=[1, 2, 4],
                   help="dilation rate r of each pattern (one per segment length)")
    p.add_argument("--causal", action="store_true", help="causal masking")
    p.add_argument("--device", type=_cli.device, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=_cli.DTYPES, default="bfloat16" if gpu else "float32",
                   help="dtype of q, k, v (bfloat16 on a GPU, float32 on CPU)")
    return p


def main(argv: list[str] | None = None) -> None:
    _demo(build_parser().parse_args(argv))


def _demo(args) -> None:
    from ._validation import check_patterns

    _cli.check(check_patterns, args.segments, args.dilations)
    device, dtype = _cli.resolve_device(args.device), getattr(torch, args.dtype)
    shape = (1, args.seq, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    run = lambda: dilated_attention(q, k, v, args.segments, args.dilations, is_causal=args.causal)  # noqa: E731
    ms, _ = measure(run, device, warmup=2, repeats=5)

    n_check = min(args.seq, 1024)
    qs, ks, vs = (t[:, :n_check] for t in (q, k, v))
    out = dilated_attention(qs, ks, vs, args.segments, args.dilations, is_causal=args.causal)
    ref = dilated_attention(qs, ks, vs, args.segments, args.dilations, is_causal=args.causal, backend="reference")
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()

    print(f"dilated attention  b=1 n={args.seq} h={args.heads} d={args.head_dim} {args.dtype} on {device}")
    print(f"patterns           w={args.segments} r={args.dilations} causal={args.causal}")
    print(f"backend            {explain_backend(q)}")
    print(f"forward time       {ms:.2f} ms (median)")
    print(f"rel. error vs float64 reference (first {n_check} tokens): {err:.2e}")
