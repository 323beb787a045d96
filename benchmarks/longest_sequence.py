"""Longest sequence that one GPU runs, forward and forward+backward (b=1, bf16).

Tries increasing lengths per mode and stops at the first out-of-memory; writes JSON to --out.

    python benchmarks/longest_sequence.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dilated_attention_pytorch import dilated_attention

M = 1 << 20


def attempt(n: int, backward: bool, args) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        q = torch.randn(1, n, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        k = torch.randn_like(q).requires_grad_(backward)
        v = torch.randn_like(q).requires_grad_(backward)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = dilated_attention(q, k, v, args.segments, args.dilations, backend=args.backend)
        if backward:
            out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        ok = bool(torch.isfinite(out).all()) and (not backward or bool(torch.isfinite(q.grad).all()))
        rec = dict(n=n, backward=backward, status="ok" if ok else "non-finite", s=time.perf_counter() - t0,
                   peak_gb=torch.cuda.max_memory_allocated() / 2**30)
    except torch.cuda.OutOfMemoryError:
        rec = dict(n=n, backward=backward, status="out of memory")
    finally:
        q = k = v = out = None  # noqa: F841
    print(json.dumps(rec), flush=True)
    return rec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--segments", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--dilations", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--backend", default="auto")
    p.add_argument("--fwdbwd", type=float, nargs="+", default=[3, 3.5, 4], help="lengths to try, in Mi tokens")
    p.add_argument("--fwd", type=float, nargs="+", default=[5, 6, 7, 8])
    a = p.parse_args()
    rows = []
    for backward, lengths in ((True, a.fwdbwd), (False, a.fwd)):
        for mi in lengths:
            rec = attempt(int(mi * M) // 32768 * 32768, backward, a)
            rows.append(rec)
            if rec["status"] != "ok":
                break
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "longest_sequence.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                                 torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
