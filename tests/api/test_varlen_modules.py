"""The modules take ``cu_seqlens``/``max_seqlen``/``sequence_starts`` as ``dilated_attention`` does; modules
that split a sequence another way (over ranks) reject them with a clear error."""

from __future__ import annotations

import random

import pytest
import torch

from dilated_attention_pytorch import (
    DilatedAttention,
    ImprovedDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
)
from dilated_attention_pytorch.parallel.ring import RingDilatedAttention

WS, RS = (4, 8, 16), (1, 2, 4)


def cu_of(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)


@pytest.mark.parametrize("cls", [DilatedAttention, ImprovedDilatedAttention])
def test_core_module_packed_equals_documents_alone(cls):
    lengths = [random.randint(1, 30) for _ in range(3)]
    total = sum(lengths)
    q, k, v = (torch.randn(total, 4, 8, dtype=torch.float64) for _ in range(3))
    m = cls(WS, RS)
    out = m(q, k, v, is_causal=True, cu_seqlens=cu_of(lengths), max_seqlen=max(lengths))
    start = 0
    for n in lengths:
        alone = m(*(x[None, start:start + n] for x in (q, k, v)), is_causal=True)[0]
        torch.testing.assert_close(out[start:start + n], alone, atol=1e-12, rtol=0)
        start += n


@pytest.mark.parametrize("cls", [MultiheadDilatedAttention, ImprovedMultiheadDilatedAttention])
def test_multihead_packed_and_left_padded_equal_unpadded(cls):
    m = cls(32, 4, segment_lengths=WS, dilation_rates=RS, dtype=torch.float64)
    lengths = [random.randint(1, 30) for _ in range(3)]
    x = torch.randn(sum(lengths), 32, dtype=torch.float64)
    out, _ = m(x, x, x, is_causal=True, cu_seqlens=cu_of(lengths))
    assert out.shape == x.shape
    start, n_max = 0, max(lengths)
    padded = torch.randn(len(lengths), n_max, 32, dtype=torch.float64)  # left padding: random values
    starts = []
    for i, n in enumerate(lengths):
        doc = x[start:start + n]
        alone, _ = m(doc[None], doc[None], doc[None], is_causal=True)
        torch.testing.assert_close(out[start:start + n], alone[0], atol=1e-12, rtol=0)
        padded[i, n_max - n:] = doc
        starts.append(n_max - n)
        start += n
    left, _ = m(padded, padded, padded, is_causal=True, sequence_starts=starts)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(left[i, n_max - n:], out[sum(lengths[:i]):sum(lengths[:i + 1])], atol=1e-12, rtol=0)


def test_multihead_packed_rejects_batched_input():
    m = MultiheadDilatedAttention(16, 2, segment_lengths=(4,), dilation_rates=(1,))
    x = torch.randn(1, 10, 16)
    with pytest.raises(ValueError, match=r"query must have shape \(total, embed_dim=16\)"):
        m(x, x, x, cu_seqlens=cu_of([4, 6]))


def test_ring_module_rejects_packed_documents():
    """Ring sequence parallelism with packed documents: a clear error naming the limitation (before any
    collective, so no process group is needed)."""
    m = RingDilatedAttention((4,), (1,))
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match=r"RingDilatedAttention does not support variable-length inputs \(cu_seqlens"):
        m(q, q, q, cu_seqlens=cu_of([4, 6]))
    with pytest.raises(ValueError, match="sequence_starts"):
        m(q[None], q[None], q[None], sequence_starts=[2])
