"""Layout mistakes: a query/key length mismatch named as such, ``batch_first`` with nn.MultiheadAttention's
meaning, and state-dict errors that point to the conversion methods."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import (
    ImprovedMultiheadDilatedAttention, MultiheadDilatedAttention, dilated_attention,
)

SEGS, DILS = [8, 16], [1, 2]


def test_query_key_length_mismatch_is_named():
    q, k = torch.randn(2, 32, 4, 8), torch.randn(2, 24, 4, 8)
    with pytest.raises(ValueError, match=r"same sequence length \(dim 1\), but query has 32 tokens and key 24"):
        dilated_attention(q, k, k, SEGS, DILS)
    with pytest.raises(ValueError, match=r"same head_dim \(dim 3\), but got 8 and 16"):
        dilated_attention(q, torch.randn(2, 32, 4, 16), torch.randn(2, 32, 4, 16), SEGS, DILS)
    with pytest.raises(ValueError, match="same batch size, but query has 2 and key 3"):
        dilated_attention(q, torch.randn(3, 32, 4, 8), torch.randn(3, 32, 4, 8), SEGS, DILS)


def test_sdpa_layout_mistake_gets_the_layout_hint_when_shapes_disagree():
    # (b, h, n, d) as for SDPA, with 8 query heads and 2 key/value heads: the "lengths" now differ
    q, k = torch.randn(1, 8, 64, 16), torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match=r"not \(batch, heads, seq, head_dim\).*transpose\(1, 2\)"):
        dilated_attention(q, k, k, SEGS, DILS)
    out = dilated_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), SEGS, DILS)  # the fix works
    assert out.shape == (1, 64, 8, 16)


@pytest.mark.parametrize("cls", [MultiheadDilatedAttention, ImprovedMultiheadDilatedAttention])
def test_batch_first_false_takes_seq_batch_embed(cls):
    first = cls(32, 4, segment_lengths=SEGS, dilation_rates=DILS)
    assert first.batch_first
    second = cls(32, 4, segment_lengths=SEGS, dilation_rates=DILS, batch_first=False)
    second.load_state_dict(first.state_dict())
    x = torch.randn(3, 20, 32)  # (b, n, e)
    mask = torch.rand(3, 20) < 0.2
    mask[:, 0] = False
    y, _ = first(x, x, x, is_causal=True, key_padding_mask=mask)
    y_t, _ = second(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), is_causal=True, key_padding_mask=mask)
    assert y_t.shape == (20, 3, 32)
    torch.testing.assert_close(y_t.transpose(0, 1), y)
    xt = x.transpose(0, 1)
    y_self, _ = second(xt, xt, xt, is_causal=True, key_padding_mask=mask)  # one tensor: fused path
    torch.testing.assert_close(y_self, y_t)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape .*batch_first=False"):
        first(xt, xt, xt, key_padding_mask=mask)  # (n, b, e) into a batch-first module
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        cls(32, 4, segment_lengths=SEGS, dilation_rates=DILS, batch_first="no")
    if cls is ImprovedMultiheadDilatedAttention:
        assert not second.to_multihead().batch_first


def test_state_dict_of_the_other_class_points_to_the_conversion():
    plain = MultiheadDilatedAttention(32, 4, segment_lengths=SEGS, dilation_rates=DILS)
    fused = ImprovedMultiheadDilatedAttention(32, 4, segment_lengths=SEGS, dilation_rates=DILS)
    with pytest.raises(RuntimeError, match=r"ImprovedMultiheadDilatedAttention.from_multihead\(m\)"):
        fused.load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match=r"m.to_multihead\(\)"):
        plain.load_state_dict(fused.state_dict())
    wrapped = torch.nn.Sequential(fused)
    with pytest.raises(RuntimeError, match=r"state dict at '0.'.*from_multihead"):
        wrapped.load_state_dict(torch.nn.Sequential(plain).state_dict())
    converted = ImprovedMultiheadDilatedAttention.from_multihead(plain)
    x = torch.randn(2, 20, 32)
    torch.testing.assert_close(converted(x, x, x)[0], plain(x, x, x)[0])
