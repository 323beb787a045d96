"""Block-sparse attention on one GPU: correctness first, then time against dense cuDNN attention.

1. Correctness at small sizes against the dense float64 masked reference (forward, LSE, gradients,
   including through the LSE) for the Triton, FlexAttention and portable paths, in bf16; the error must
   stay within 2x that of dense masked SDPA in bf16 (plus a small floor).
2. bf16, h=16, d=128, block 128, ~10% density random per-head layout, n = 64K and 256K: forward+backward
   time of ``block_sparse_attention`` (the backend "auto" picks, FlexAttention, our Triton kernels) against dense cuDNN
   SDPA (``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``), and TF/s per active block against the dense
   kernel's.

Writes ``block_sparse_bench.json`` under --out. Meant to finish in under 4 minutes on one H200.

    python benchmarks/block_sparse_bench.py --out results/block_sparse
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dilated_attention_pytorch.bench.block_sparse_problem import block_sparse_problem, dense_cudnn_fwd_bwd
from dilated_attention_pytorch.bench.measure import measure
from dilated_attention_pytorch.block_sparse import (
    METADATA_CACHE,
    block_sparse_attention,
    block_sparse_backend,
    random_layout,
)
from dilated_attention_pytorch.block_sparse.flex import flex_block_sparse_attention, layout_block_mask
from dilated_attention_pytorch.block_sparse.reference import layout_to_token_mask, reference_block_sparse_attention

TIME_BUDGET_S = 220.0  # stop starting new measurements after this (the whole run must stay < 4 min)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def qkv(b, n, h, h_kv, d, dtype, requires_grad=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(b, n, heads, d, device="cuda", dtype=dtype, generator=gen).requires_grad_(requires_grad)
        for heads in (h, h_kv, h_kv)
    ]


def check_case(n, h, h_kv, causal, backend, with_lse) -> dict:
    """bf16 ours vs float64 reference, next to plain bf16 masked SDPA vs the same reference."""
    bs, d = 128, 128
    nb = -(-n // bs)
    layout = random_layout(nb, 0.3, num_heads=h, seed=1, device="cuda")
    layout[0, nb // 2] = False  # an empty row
    q, k, v = qkv(1, n, h, h_kv, d, torch.float64, seed=n)
    ref, ref_lse = reference_block_sparse_attention(q, k, v, layout, block_size=bs, is_causal=causal)
    fin = torch.isfinite(ref_lse)
    g_out = torch.randn_like(ref)
    g_lse = torch.randn_like(ref_lse) if with_lse else torch.zeros_like(ref_lse)
    ref_loss = (ref * g_out).sum() + (torch.where(fin, ref_lse, 0.0) * g_lse).sum()
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))

    ql, kl, vl = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    out, lse = block_sparse_attention(ql, kl, vl, layout, block_size=bs, is_causal=causal, return_lse=True,
                                      backend=backend)
    loss = (out.double() * g_out).sum()
    if with_lse:
        loss = loss + (torch.where(fin, lse.double(), 0.0) * g_lse).sum()
    grads = torch.autograd.grad(loss, (ql, kl, vl))

    # plain PyTorch in the same precision: dense masked SDPA (math backend: arbitrary bool masks)
    qp, kp, vp = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    group = h // h_kv
    mask = layout_to_token_mask(layout, n, bs, h, causal)[None]
    has_key = mask.any(-1, keepdim=True)  # (1, h, n, 1)
    mask = mask | ~has_key  # SDPA gives NaN on empty rows: let them see everything, then zero them
    with sdpa_kernel(SDPBackend.MATH):
        plain = torch.nn.functional.scaled_dot_product_attention(
            qp.transpose(1, 2), kp.repeat_interleave(group, 2).transpose(1, 2),
            vp.repeat_interleave(group, 2).transpose(1, 2), attn_mask=mask,
        )
    plain = (plain * has_key).transpose(1, 2)
    plain_grads = torch.autograd.grad((plain.double() * g_out).sum(), (qp, kp, vp))
    rec = dict(n=n, h=h, h_kv=h_kv, causal=causal, backend=backend, lse_grad=with_lse,
               out_err=rel(out, ref), plain_out_err=rel(plain, ref),
               lse_max_abs_err=(lse.double() - ref_lse)[fin].abs().max().item(),
               empty_rows_ok=bool(torch.isneginf(lse[~fin]).all() and (out.transpose(1, 2)[~fin] == 0).all()))
    ok = rec["out_err"] <= 2 * rec["plain_out_err"] + 1e-3 and rec["empty_rows_ok"] and rec["lse_max_abs_err"] < 5e-2
    for name, g, r, p in zip("qkv", grads, ref_grads, plain_grads):
        rec[f"d{name}_err"] = rel(g, r)
        rec[f"plain_d{name}_err"] = rel(p, r)
        ok &= bool(torch.isfinite(g).all()) and rec[f"d{name}_err"] <= 2 * rec[f"plain_d{name}_err"] + 1e-3
    rec["ok"] = bool(ok)
    return rec


def flops_fwd_bwd(b, h, n, d, fraction) -> float:
    """Matmul FLOPs of attention forward (2 matmuls) + backward (5 matmuls) over a fraction of the scores."""
    return 14.0 * b * h * n * n * d * fraction


def bench_size(n, warmup, repeats) -> dict:
    prob = block_sparse_problem(n)  # ~10% density incl. the diagonal, bf16, h = 16, d = 128, block 128
    b, _, h, d = prob.q.shape
    bs, layout, density = prob.block_size, prob.layout, prob.density
    q, k, v, g = prob.q, prob.k, prob.v, prob.grad
    dense = dense_cudnn_fwd_bwd(prob)

    def sparse_api() -> None:  # the public function: layout hash, cached metadata, the backend "auto" picks
        out = block_sparse_attention(q, k, v, layout, block_size=bs)
        out.backward(g)

    def sparse_flex_api() -> None:  # the public function on FlexAttention
        out = block_sparse_attention(q, k, v, layout, block_size=bs, backend="flex")
        out.backward(g)

    def sparse_triton_api() -> None:  # the public function on our Triton kernels
        out = block_sparse_attention(q, k, v, layout, block_size=bs, backend="triton")
        out.backward(g)

    block_mask = layout_block_mask(layout, n, bs, False)

    def sparse_kernel() -> None:  # the same kernel with the block mask already in hand
        out, _ = flex_block_sparse_attention(q, k, v, block_mask, scale=d**-0.5)
        out.backward(g)

    t0 = time.perf_counter()
    sparse_kernel()  # compile (first call for this shape)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    rec = dict(n=n, b=b, h=h, d=d, block_size=bs, density=density, compile_s=compile_s,
               api_backend=block_sparse_backend(q, bs))
    rec["dense_cudnn_ms"], rec["dense_peak_bytes"] = measure(dense, torch.device("cuda"), warmup, repeats)
    rec["sparse_api_ms"], rec["sparse_peak_bytes"] = measure(sparse_api, torch.device("cuda"), warmup, repeats)
    rec["sparse_kernel_ms"], _ = measure(sparse_kernel, torch.device("cuda"), warmup, repeats)
    rec["sparse_flex_api_ms"], _ = measure(sparse_flex_api, torch.device("cuda"), warmup, repeats)
    rec["sparse_triton_api_ms"], _ = measure(sparse_triton_api, torch.device("cuda"), warmup, repeats)
    dense_tf = flops_fwd_bwd(b, h, n, d, 1.0) / (rec["dense_cudnn_ms"] * 1e-3) / 1e12
    for name in ("sparse_api", "sparse_kernel", "sparse_flex_api", "sparse_triton_api"):
        tf = flops_fwd_bwd(b, h, n, d, density) / (rec[f"{name}_ms"] * 1e-3) / 1e12
        rec[f"{name}_time_ratio"] = rec[f"{name}_ms"] / rec["dense_cudnn_ms"]
        rec[f"{name}_tflops_active"] = tf
        rec[f"{name}_tflops_ratio"] = tf / dense_tf
    rec["dense_tflops"] = dense_tf
    rec["meets_time_target"] = rec["sparse_api_time_ratio"] <= 0.15
    rec["meets_tflops_target"] = rec["sparse_api_tflops_ratio"] >= 0.6
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("block_sparse_bench.py needs a CUDA GPU")
    a.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, checks=[], sizes=[], skipped=[])
    path = a.out / "block_sparse_bench.json"

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - start
        result["cache"] = METADATA_CACHE.stats().__dict__
        path.write_text(json.dumps(result, indent=2))

    cases = [  # (n, h, h_kv, causal, backend, lse_grad)
        (1000, 16, 16, False, "flex", False),  # n % block != 0
        (1024, 16, 4, True, "flex", False),  # GQA, causal
        (1000, 16, 16, False, "flex", True),  # gradient through the LSE
        (1000, 16, 16, False, "triton", True),  # n % block != 0, LSE gradient
        (1024, 16, 4, True, "triton", False),  # GQA, causal
        (8192 - 50, 16, 16, False, "triton", True),  # 1024 programs: walks start at nonzero phases
        (8192, 16, 4, True, "triton", False),  # the same with GQA, causal
        (1000, 16, 4, True, "portable", True),  # n % block != 0 (masked last tile), LSE gradient
        (1024, 16, 4, True, "portable", False),  # fused CUDA kernels per tile group
    ]
    for case in cases:
        t0 = time.perf_counter()
        try:  # a failing check is recorded (with its error) and the run goes on to the timings
            rec = check_case(*case)
        except (RuntimeError, NotImplementedError, ValueError, AssertionError) as err:
            rec = dict(case=list(case), ok=False, error=f"{type(err).__name__}: {err}"[:2000])
        rec["seconds"] = time.perf_counter() - t0
        result["checks"].append(rec)
        print(json.dumps(rec), flush=True)
        save()
    result["all_checks_ok"] = all(r["ok"] for r in result["checks"])
    for n in a.sizes:
        if time.perf_counter() - start > TIME_BUDGET_S:
            result["skipped"].append(dict(n=n, why=f"time budget {TIME_BUDGET_S}s spent"))
            continue
        rec = bench_size(n, warmup=1, repeats=a.repeats)
        result["sizes"].append(rec)
        print(json.dumps(rec), flush=True)
        save()
    save()
    print("| n | density | dense cuDNN ms | block-sparse ms (api / kernel) | time ratio | TF/s active (ratio) |")
    print("|---|---|---|---|---|---|")
    for r in result["sizes"]:
        print(f"| {r['n']} | {r['density']:.3f} | {r['dense_cudnn_ms']:.1f} | {r['sparse_api_ms']:.1f} / "
              f"{r['sparse_kernel_ms']:.1f} | {r['sparse_api_time_ratio']:.3f} | "
              f"{r['sparse_api_tflops_active']:.0f} ({r['sparse_api_tflops_ratio']:.2f}) |")
    print(f"wrote {path}; checks ok: {result['all_checks_ok']}")


if __name__ == "__main__":
    main()
