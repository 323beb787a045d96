"""FlexAttention kernel options for block-sparse attention: forward+backward time per option set.

bf16, h = 16, d = 128, block 128, ~10% density random per-head layout (as in block_sparse_bench.py).
For each option set it checks the output against the default options' output (same math, so only
rounding differs), then times forward, and forward+backward, next to dense cuDNN SDPA. The option sets
are FlexAttention's ``kernel_options`` (``fwd_``/``bwd_`` prefixes apply to one pass).

    python benchmarks/flex_tuning.py --out results/flex --sizes 65536
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

OPTION_SETS = {
    "default": {},
    "tma": {"USE_TMA": True},
    "fwd128x128w8s2": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2},
    "fwd128x128w8s2+tma": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2,
                           "USE_TMA": True},
    "fwd128x64w4s3": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
    "bwd64x128w8s2": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
                      "bwd_num_warps": 8, "bwd_num_stages": 2},
    "bwd64x64w4s3": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                     "bwd_num_warps": 4, "bwd_num_stages": 3},
    "bwd128x128w8s2": {"bwd_BLOCK_M1": 128, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 128,
                       "bwd_num_warps": 8, "bwd_num_stages": 2},
}
_HOPPER = OPTION_SETS["fwd128x128w8s2+tma"]
OPTION_SETS.update({
    "fwd128x128w8s2+fwdtma": {k: v for k, v in _HOPPER.items() if k != "USE_TMA"} | {"fwd_USE_TMA": True},
    "fwd128x128w8s3+tma": _HOPPER | {"fwd_num_stages": 3},
    "fwd128x128w8s2+tma+bwds4": _HOPPER | {"bwd_num_stages": 4},
    "fwd128x128w8s2+tma+bwdw4": _HOPPER | {"bwd_num_warps": 4},
    "fwd128x128w8s2+tma+bwd64x128w8s3": _HOPPER | {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                                  "bwd_BLOCK_N2": 64, "bwd_num_warps": 8, "bwd_num_stages": 3},
    # every row of the layout has a key block (the diagonal): the kernel may skip its empty-row guards
    "hopper+safe": _HOPPER | {"ROWS_GUARANTEED_SAFE": True},
    # q scaled once before the loop instead of every score tile (q rounded to bf16 after scaling)
    "hopper+prescale": _HOPPER | {"PRESCALE_QK": True},
    "hopper+safe+prescale": _HOPPER | {"ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": True},
    "hopper+bwd32x128w4s3": _HOPPER | {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                       "bwd_BLOCK_N2": 32, "bwd_num_warps": 4, "bwd_num_stages": 3},
    "hopper+bwd64x128w8s3-dq128": _HOPPER | {"bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 128},
    "hopper+bwd5stages": _HOPPER | {"bwd_num_stages": 5},
})


def host_times(q, k, v, g, block_mask, d, opts, calls: int = 5) -> dict:
    """Host milliseconds to issue the forward call and the backward call (no synchronisation inside)."""
    fwd, bwd = [], []
    for _ in range(calls):
        for t in (q, k, v):
            t.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out, _ = flex_block_sparse_attention(q, k, v, block_mask, scale=d**-0.5, kernel_options=opts)
        t1 = time.perf_counter()
        out.backward(g)
        t2 = time.perf_counter()
        torch.cuda.synchronize()
        fwd.append((t1 - t0) * 1e3)
        bwd.append((t2 - t1) * 1e3)
    return dict(host_fwd_ms=sorted(fwd)[calls // 2], host_bwd_ms=sorted(bwd)[calls // 2])


def host_profile(fn, path: Path, calls: int = 20) -> None:
    """cProfile of ``calls`` forward+backward calls (synchronised after each), written as text by own
    time and by cumulative time, and a Chrome trace of one more call beside it."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    pr = cProfile.Profile()
    for _ in range(calls):
        torch.cuda.synchronize()
        pr.enable()
        fn()
        pr.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    for order in ("tottime", "cumulative"):
        pstats.Stats(pr, stream=text).sort_stats(order).print_stats(40)
    path.write_text(text.getvalue())
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path.with_suffix(".trace.json")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[65536])
    p.add_argument("--sets", nargs="+", default=list(OPTION_SETS), choices=list(OPTION_SETS))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=200.0, help="start no new measurement after this")
    p.add_argument("--max-autotune", action="store_true",
                   help="let the compiler time its own tile configurations (it prints its table to stderr)")
    p.add_argument("--profile", action="store_true", help="also record GPU time by kernel of one fwd+bwd call")
    p.add_argument("--host-profile", action="store_true",
                   help="also write a cProfile text and a Chrome trace of the host side, per option set")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("flex_tuning.py needs a CUDA GPU")
    for name in ("recompile_limit", "cache_size_limit"):  # one compiled kernel per option set and size
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    if a.max_autotune:
        import torch._inductor.config as inductor_config

        inductor_config.max_autotune = True
    a.out.mkdir(parents=True, exist_ok=True)
    start, rows = time.perf_counter(), []
    d = a.head_dim
    dev = torch.device("cuda")
    for n in a.sizes:
        prob = block_sparse_problem(n, head_dim=d)
        q, k, v, g, density = prob.q, prob.k, prob.v, prob.grad, prob.density
        block_mask = layout_block_mask(prob.layout, n, prob.block_size, False)
        dense_ms, _ = measure(dense_cudnn_fwd_bwd(prob), dev, 1, a.repeats)
        ref = None
        for name in a.sets:
            if time.perf_counter() - start > a.budget_s:
                rows.append(dict(n=n, options=name, skipped="time budget spent"))
                continue
            opts = OPTION_SETS[name]

            def fwd() -> torch.Tensor:
                with torch.no_grad():
                    return flex_block_sparse_attention(q, k, v, block_mask, scale=d**-0.5, kernel_options=opts)[0]

            def fwdbwd() -> None:
                for t in (q, k, v):
                    t.grad = None
                out, _ = flex_block_sparse_attention(q, k, v, block_mask, scale=d**-0.5, kernel_options=opts)
                out.backward(g)

            rec = dict(n=n, d=d, options=name, kernel_options=opts, density=density, dense_fwdbwd_ms=dense_ms)
            try:
                t0 = time.perf_counter()
                fwdbwd()
                torch.cuda.synchronize()
                rec["compile_s"] = time.perf_counter() - t0
                out = fwd().float()
                ref = out if ref is None else ref
                rec["rel_diff_vs_default"] = ((out - ref).norm() / ref.norm()).item()
                rec["fwd_ms"], _ = measure(fwd, dev, 1, a.repeats)
                rec["fwdbwd_ms"], rec["peak_bytes"] = measure(fwdbwd, dev, 1, a.repeats)
                rec["time_ratio"] = rec["fwdbwd_ms"] / dense_ms
                rec["per_block_ratio"] = density / rec["time_ratio"]
                if a.profile:
                    rec["kernels_ms"] = kernel_times(fwdbwd)
                    rec.update(host_times(q, k, v, g, block_mask, d, opts))
                if a.host_profile:
                    host_profile(fwdbwd, a.out / f"host-{name}.txt")
            except (RuntimeError, ValueError) as err:  # compile errors (e.g. too much shared memory): recorded
                rec["error"] = f"{type(err).__name__}: {err}"[:500]
            rows.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "kernel_options"}), flush=True)
            (a.out / f"flex_tuning-d{d}.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                                    torch=torch.__version__, rows=rows), indent=1))
    print("| n | d | options | fwd ms | fwd+bwd ms | dense fwd+bwd ms | time ratio | per-block ratio | rel diff |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "fwdbwd_ms" in r:
            print(f"| {r['n']} | {d} | {r['options']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | {r['dense_fwdbwd_ms']:.1f} "
                  f"| {r['time_ratio']:.4f} | {r['per_block_ratio']:.3f} | {r['rel_diff_vs_default']:.1e} |")
        else:
            print(f"| {r['n']} | {d} | {r['options']} | {r.get('error') or r.get('skipped')} |")


if __name__ == "__main__":
    main()
