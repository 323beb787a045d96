"""Tile settings of the Triton block-sparse kernels: forward and forward+backward time per setting,
next to FlexAttention on the same block mask and dense cuDNN SDPA, all in one run.

bf16, h = 16, d = 128, block 128, ~10% density random per-head layout (as in block_sparse_bench.py).
Each setting's output is checked against FlexAttention's (same math, rounding differs).

    python benchmarks/triton_tuning.py --out results/triton --sizes 65536
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dilated_attention_pytorch.bench.block_sparse_problem import block_sparse_problem, dense_cudnn_fwd_bwd, kernel_times
from dilated_attention_pytorch.bench.measure import measure
from dilated_attention_pytorch.block_sparse.flex import flex_block_sparse_attention, layout_block_mask
from dilated_attention_pytorch.block_sparse.triton_path import (
    LOADS,
    TileSettings,
    tile_settings,
    triton_block_sparse_attention,
)

# changes to the default tile settings (TileSettings fields)
SETTINGS = {
    "default": {},
    "one-launch": dict(split_bwd=False, align=False),
    "one-launch-align": dict(split_bwd=False, align=True),
    "unaligned": dict(align=False),
    "fwd-s2": dict(fwd_stages=2),
    "bwd-s3": dict(bwd_stages=3),
    "fwd-128x64-s3": dict(fwd_n=64, fwd_stages=3),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[65536])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--loads", nargs="+", default=["auto"], choices=["auto", *LOADS],
                   help="how the kernels load tiles (each setting runs with each)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=400.0, help="start no new measurement after this")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("triton_tuning.py needs a CUDA GPU")
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    a.out.mkdir(parents=True, exist_ok=True)
    start, rows = time.perf_counter(), []
    d = 128
    dev = torch.device("cuda")
    for n in a.sizes:
        prob = block_sparse_problem(n, head_dim=d)
        q, k, v, g, density, bs = prob.q, prob.k, prob.v, prob.grad, prob.density, prob.block_size
        block_mask = layout_block_mask(prob.layout, n, bs, False)

        def runner(attend):
            def fwd() -> torch.Tensor:
                with torch.no_grad():
                    return attend()[0]

            def fwdbwd() -> None:
                for t in (q, k, v):
                    t.grad = None
                attend()[0].backward(g)

            return fwd, fwdbwd

        dense_ms, _ = measure(dense_cudnn_fwd_bwd(prob), dev, 1, a.repeats)
        flex_fwd, flex_fwdbwd = runner(lambda: flex_block_sparse_attention(q, k, v, block_mask, scale=d**-0.5))
        ref = flex_fwd().float()
        flex_fwdbwd()
        ref_grads = [t.grad.float() for t in (q, k, v)]
        rec = dict(n=n, d=d, setting="flex", density=density, dense_fwdbwd_ms=dense_ms)
        rec["fwd_ms"], _ = measure(flex_fwd, dev, 1, a.repeats)
        rec["fwdbwd_ms"], _ = measure(flex_fwdbwd, dev, 1, a.repeats)
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        for name, loads in [(s, ld) for s in a.settings for ld in a.loads]:
            if time.perf_counter() - start > a.budget_s:
                rows.append(dict(n=n, setting=name, loads=loads, skipped="time budget spent"))
                continue
            tiles = TileSettings(**{**tile_settings(d, dev).__dict__, **SETTINGS[name]})
            fwd, fwdbwd = runner(lambda: triton_block_sparse_attention(
                q, k, v, prob.layout, block_size=bs, is_causal=False, scale=d**-0.5,
                loads=None if loads == "auto" else loads, tiles=tiles))
            rec = dict(n=n, d=d, setting=f"{name} {loads}", tiles=tiles.__dict__, density=density,
                       dense_fwdbwd_ms=dense_ms)
            try:
                t0 = time.perf_counter()
                fwdbwd()
                torch.cuda.synchronize()
                rec["compile_s"] = time.perf_counter() - t0
                rec["grad_rel_diff_vs_flex"] = max(((t.grad.float() - r).norm() / r.norm()).item()
                                                   for t, r in zip((q, k, v), ref_grads))
                out = fwd().float()
                rec["rel_diff_vs_flex"] = ((out - ref).norm() / ref.norm()).item()
                rec["fwd_ms"], _ = measure(fwd, dev, 1, a.repeats)
                rec["fwdbwd_ms"], rec["peak_bytes"] = measure(fwdbwd, dev, 1, a.repeats)
                rec["kernels_ms"] = kernel_times(fwdbwd)["by_kernel"]
            except (RuntimeError, ValueError, OutOfResources, CompilationError) as err:  # recorded, the sweep goes on
                rec["error"] = f"{type(err).__name__}: {err}"[:500]
            rows.append(rec)
            print(json.dumps(rec), flush=True)
        (a.out / "triton_tuning.json").write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=1))
    print("| n | setting | fwd ms | fwd+bwd ms | dense fwd+bwd ms | time ratio | per-block ratio | rel diff (out / grads) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "fwdbwd_ms" in r:
            ratio = r["fwdbwd_ms"] / r["dense_fwdbwd_ms"]
            diff = f"{r['rel_diff_vs_flex']:.1e} / {r['grad_rel_diff_vs_flex']:.1e}" if "rel_diff_vs_flex" in r else "-"
            print(f"| {r['n']} | {r['setting']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | {r['dense_fwdbwd_ms']:.1f} "
                  f"| {ratio:.4f} | {r['density'] / ratio:.3f} | {diff} |")
        else:
            print(f"| {r['n']} | {r['setting']} | {r.get('error') or r.get('skipped')} |")


if __name__ == "__main__":
    main()
