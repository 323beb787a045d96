"""GPU check of the block kernels on the engine's strided (dilated) views.

For each CUDA block kernel: forward output/LSE against the float32 math kernel on the same strided
views, and backward driven by a *foreign* output/LSE (as the engine passes merged ones) against the
math kernel's backward with the same output/LSE. Then times each kernel on strided views against the
same data made contiguous, to show what a gather copy would cost. Writes JSON to --out.

    python benchmarks/gpu_kernel_check.py --out results/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dilated_attention_pytorch.bench.measure import measure
from dilated_attention_pytorch.kernels import CudaFlashKernel, CudnnKernel, MathKernel


def strided_blocks(b, n, h, d, w, r, o, dtype):
    """q, k, v of one (pattern, offset) as the engine sees them: (b*n/w, h/r, w/r, d) strided views."""
    base = [torch.randn(b, n, h, d, device="cuda", dtype=dtype) for _ in range(3)]
    views = []
    for x in base:
        v = x.unflatten(1, (n // w, w))[:, :, o::r][:, :, :, o::r]  # rows of offset o, heads j = o (mod r)
        views.append(v.reshape(b * (n // w), w // r, h // r, d).transpose(1, 2))
    return views


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    math_k = MathKernel()
    for kernel in (CudnnKernel(), CudaFlashKernel()):
        for causal in (False, True):
            q, k, v = strided_blocks(2, 4096, 8, 128, 1024, 4, 1, torch.bfloat16)
            rec = dict(kernel=kernel.name, causal=causal, strided=not q.is_contiguous())
            out, lse, rng = kernel.forward(q, k, v, key_valid=None, is_causal=causal, scale=0.1, dropout_p=0.0)
            m_out, m_lse, _ = math_k.forward(q, k, v, key_valid=None, is_causal=causal, scale=0.1, dropout_p=0.0)
            rec.update(out_err=rel(out, m_out), lse_err=(lse.float() - m_lse).abs().max().item(),
                       lse_shape=list(lse.shape))
            # a foreign output/LSE, as after merging with another pattern
            f_out = (out.float() * 0.7 + torch.randn_like(out.float()) * 0.1).to(out.dtype)
            f_lse = lse.float() + 0.5
            dout = torch.randn_like(out)
            grads = kernel.backward(dout, q, k, v, f_out, f_lse, rng, key_valid=None, is_causal=causal, scale=0.1,
                                    dropout_p=0.0, delta=None)
            ref = math_k.backward(dout, q, k, v, f_out, f_lse, None, key_valid=None, is_causal=causal, scale=0.1,
                                  dropout_p=0.0, delta=None)
            rec.update(grad_errs=[rel(g, r) for g, r in zip(grads, ref)])
            # strided vs contiguous timing at a realistic size
            qs, ks, vs = strided_blocks(1, 65536, 16, 128, 8192, 4, 1, torch.bfloat16)
            qc, kc, vc = (x.contiguous() for x in (qs, ks, vs))
            for name, (x, y, z) in (("strided", (qs, ks, vs)), ("contiguous", (qc, kc, vc))):
                ms, _ = measure(lambda: kernel.forward(x, y, z, key_valid=None, is_causal=causal, scale=0.1,
                                                       dropout_p=0.0), torch.device("cuda"), 2, 10)
                o2, l2, r2 = kernel.forward(x, y, z, key_valid=None, is_causal=causal, scale=0.1, dropout_p=0.0)
                d2 = torch.randn_like(o2)
                ms_b, _ = measure(lambda: kernel.backward(d2, x, y, z, o2, l2, r2, key_valid=None, is_causal=causal,
                                                          scale=0.1, dropout_p=0.0, delta=None),
                                  torch.device("cuda"), 2, 10)
                rec[f"fwd_ms_{name}"], rec[f"bwd_ms_{name}"] = ms, ms_b
            results.append(rec)
            print(json.dumps(rec))
    (a.out / "gpu_kernel_check.json").write_text(json.dumps(dict(torch=torch.__version__,
                                                                 device=torch.cuda.get_device_name(),
                                                                 results=results), indent=1))


if __name__ == "__main__":
    main()
