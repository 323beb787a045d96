"""The fused backend on packed documents and left-padded rows (GPU only): each document's output and
gradients equal those of the document alone on the same path, to bf16 rounding."""

from __future__ import annotations

import random

import pytest
import torch

from dilated_attention_pytorch import dilated_attention

pytestmark = pytest.mark.cuda

WS, RS = (64, 128, 256), (1, 2, 4)


@pytest.mark.parametrize("is_causal", [False, True])
def test_fused_packed_documents_equal_each_document_alone(is_causal):
    lengths = [random.randint(1, 600) for _ in range(4)]
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (8, 4, 4))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    out = dilated_attention(q, k, v, WS, RS, is_causal=is_causal, cu_seqlens=cu, backend="fused")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    start = 0
    for n in lengths:
        part = [x[start:start + n].detach()[None].requires_grad_() for x in (q, k, v)]
        alone = dilated_attention(*part, WS, RS, is_causal=is_causal, backend="fused")
        torch.testing.assert_close(out[start:start + n], alone[0], atol=2e-2, rtol=2e-2)
        for grad, ref in zip(grads, torch.autograd.grad(alone, part, g[start:start + n][None])):
            torch.testing.assert_close(grad[start:start + n], ref[0], atol=5e-2, rtol=5e-2)
        start += n


def test_fused_left_padding_equals_unpadded():
    b, n = 3, 700
    starts = [0, random.randint(1, n - 1), random.randint(1, n - 1)]
    q, k, v = (torch.randn(b, n, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = dilated_attention(q, k, v, WS, RS, is_causal=True, sequence_starts=starts, backend="fused")
    for i, s in enumerate(starts):
        alone = dilated_attention(q[i:i + 1, s:], k[i:i + 1, s:], v[i:i + 1, s:], WS, RS, is_causal=True,
                                  backend="fused")
        torch.testing.assert_close(out[i:i + 1, s:], alone, atol=2e-2, rtol=2e-2)
        assert bool((out[i, :s] == 0).all())
