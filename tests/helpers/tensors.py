"""Devices, low-precision dtypes, random inputs (fresh each run) and relative error against a reference."""

from __future__ import annotations

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW_PRECISION = [torch.bfloat16, torch.float16]


def rand_qkv(b, n, h, h_kv, d, *, dtype=torch.float64, device="cpu", requires_grad=True, generator=None):
    """Fresh random inputs; never zeros."""
    def one(heads):
        t = torch.randn(b, n, heads, d, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return one(h), one(h_kv), one(h_kv)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()
