"""The block engine's sequence chunking and backend choice."""

from __future__ import annotations

import pytest
import torch

from conftest import rand_qkv
from dilated_attention_pytorch import dilated_attention, explain_backend
from dilated_attention_pytorch.engine import EngineOptions, chunk_bounds, run_engine
from dilated_attention_pytorch.kernels import CpuFlashKernel, MathKernel
from dilated_attention_pytorch.reference import reference_dilated_attention


@pytest.mark.parametrize(
    "n,segments,target,expected",
    [
        (40, (4, 8), 16, [(0, 16), (16, 32), (32, 40)]),
        (40, (4, 6), 16, [(0, 12), (12, 24), (24, 36), (36, 40)]),
        (40, (7, 9), 16, [(0, 40)]),  # lcm 63 > n: one chunk
        (10, (16,), 4, [(0, 10)]),
    ],
)
def test_chunk_bounds(n, segments, target, expected):
    assert chunk_bounds(n, segments, target) == expected


@pytest.mark.parametrize("kernel", [CpuFlashKernel(), MathKernel()], ids=lambda k: k.name)
@pytest.mark.parametrize("is_causal", [False, True])
def test_chunked_engine_matches_reference(kernel, is_causal):
    n, ws, rs = 45, (4, 8, 12), (1, 2, 3)
    q, k, v = rand_qkv(2, n, 6, 3, 8)
    mask = torch.rand(2, n) < 0.3
    opts = EngineOptions(ws, rs, "paper", False, is_causal, 0.3, 0.0, kernel, chunk_tokens=24)
    out, lse = run_engine(q, k, v, ~mask, opts)
    ref, ref_lse = reference_dilated_attention(q, k, v, ws, rs, is_causal=is_causal, scale=0.3, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse.transpose(1, 2), ref_lse, atol=1e-10, rtol=0)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_explain_backend_on_cpu_gives_reasons():
    q = torch.randn(1, 8, 2, 4)
    choice = explain_backend(q)
    assert choice.backend == "portable" and choice.kernel.name == "cpu_flash"
    assert any("cuda" in r for r in choice.fused_reasons["cudnn"])
    assert "fused path not used" in str(choice)
    with pytest.raises(ValueError, match="backend='fused' cannot run"):
        dilated_attention(q, q, q, [4], [1], backend="fused")
    assert explain_backend(q, dropout_p=0.1).kernel.name == "math"
