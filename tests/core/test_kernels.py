"""Each block kernel against the math kernel on the engine's layouts: strided views beside copies,
forward and a backward driven by a foreign output/LSE (as the engine passes merged ones)."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch.kernels import KERNELS, BlockInputs, MathKernel

from tests.helpers.tensors import rel_err

CASES = [(1, 16), (7, 16), (64, 64), (130, 128)]  # (rows L, head_dim)


def _available(device: torch.device, dtype: torch.dtype):
    inputs = BlockInputs(device.type, dtype, 64, False, False, False)
    return [k for k in KERNELS if not k.not_supported_reasons(inputs) and k.name != "math"]


def _blocks(device, dtype, rows, d):
    """q a strided view (rows of one offset, every other head), k a contiguous copy, v strided."""
    big = torch.randn(3, rows * 2, 4, d, device=device, dtype=torch.float32).to(dtype)
    q = big[:, ::2, ::2].transpose(1, 2)  # (3, 2, rows, d), strided
    k = torch.randn(3, 2, rows, d, device=device, dtype=torch.float32).to(dtype)  # contiguous
    v = torch.randn(3, rows * 2, 4, d, device=device, dtype=torch.float32).to(dtype)[:, 1::2, 1::2].transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("rows,d", CASES)
def test_kernels_agree_with_math(device, rows, d, is_causal):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kernels = _available(device, dtype)
    assert kernels, "every device has a fused kernel"
    math = MathKernel()
    q, k, v = _blocks(device, dtype, rows, d)
    kw = dict(key_valid=None, is_causal=is_causal, scale=0.2, dropout_p=0.0)
    ref_out, ref_lse, _ = math.forward(q, k, v, **kw)
    foreign_out = (ref_out.float() * 0.8 + 0.1 * torch.randn_like(ref_out.float())).to(dtype)
    foreign_lse = ref_lse + 0.3
    dout = torch.randn_like(ref_out)
    ref_grads = math.backward(dout, q, k, v, foreign_out, foreign_lse, None, delta=None, **kw)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for kernel in kernels:
        out, lse, rng = kernel.forward(q, k, v, **kw)
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        assert rel_err(out, ref_out) < tol, kernel.name
        assert (lse.float() - ref_lse.float()).abs().max() < tol, kernel.name
        grads = kernel.backward(dout, q, k, v, foreign_out, foreign_lse, rng, delta=None, **kw)
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) < tol, kernel.name
