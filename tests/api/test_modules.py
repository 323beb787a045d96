"""DilatedAttention and MultiheadDilatedAttention: the functional core plus projections, MAGNETO init."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.tensors import rand_qkv
from dilated_attention_pytorch import DilatedAttention, MultiheadDilatedAttention
from dilated_attention_pytorch.reference import reference_dilated_attention


def test_dilated_attention_module_matches_reference():
    q, k, v = rand_qkv(2, 40, 4, 2, 8)
    mask = torch.rand(2, 40) < 0.2
    m = DilatedAttention([8, 16], [1, 2], softmax_scale=0.2, offsets="torchscale", head_groups=True)
    out = m(q, k, v, is_causal=True, key_padding_mask=mask)
    ref, _ = reference_dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True, scale=0.2,
                                         offsets="torchscale", head_groups=True, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_dropout_only_in_training():
    q, k, v = rand_qkv(1, 32, 2, 2, 8, requires_grad=False)
    m = DilatedAttention([16], [1], attention_dropout=0.5)
    m.eval()
    a, b = m(q, k, v), m(q, k, v)
    assert torch.equal(a, b)
    m.train()
    assert not torch.equal(m(q, k, v), a)


def manual_multihead(m: MultiheadDilatedAttention, x, is_causal, mask):
    """The module's computation written out with the float64 reference."""
    h, hk, d = m.num_heads, m.num_kv_heads, m.head_dim
    q = m.q_proj(x).unflatten(-1, (h, d))
    k = m.k_proj(x).unflatten(-1, (hk, d))
    v = m.v_proj(x).unflatten(-1, (hk, d))
    c = m.attention.config
    o, _ = reference_dilated_attention(q, k, v, c.segment_lengths, c.dilation_rates, is_causal=is_causal,
                                       offsets=c.offsets, head_groups=c.head_groups, key_padding_mask=mask)
    o = o.flatten(2)
    if m.norm is not None:
        o = m.norm(o)
    return m.out_proj(o)


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_multihead_matches_manual(layer_norm, num_kv_heads):
    m = MultiheadDilatedAttention(64, 4, segment_lengths=[8, 16], dilation_rates=[1, 2], layer_norm=layer_norm,
                                  num_kv_heads=num_kv_heads, dtype=torch.float64)
    x = torch.randn(2, 37, 64, dtype=torch.float64)
    mask = torch.rand(2, 37) < 0.2
    out, weights = m(x, x, x, is_causal=True, key_padding_mask=mask)
    assert weights is None
    torch.testing.assert_close(out, manual_multihead(m, x, True, mask), atol=1e-10, rtol=0)


def test_magneto_init():
    torch.manual_seed(0)
    m = MultiheadDilatedAttention(512, 8, segment_lengths=[64], dilation_rates=[1], gamma_init=0.3)
    xavier = math.sqrt(2.0 / (512 + 512))
    assert abs(m.q_proj.weight.std().item() / xavier - 1) < 0.02
    assert abs(m.k_proj.weight.std().item() / xavier - 1) < 0.02
    assert abs(m.v_proj.weight.std().item() / (0.3 * xavier) - 1) < 0.02
    assert abs(m.out_proj.weight.std().item() / (0.3 * xavier) - 1) < 0.02
    for p in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
        assert torch.all(p.bias == 0)
    assert isinstance(m.norm, torch.nn.LayerNorm)


def test_attn_mask_causal_is_honoured_other_masks_raise():
    m = MultiheadDilatedAttention(32, 4, segment_lengths=[8], dilation_rates=[1], dtype=torch.float64)
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    causal_bool = torch.ones(12, 12, dtype=torch.bool).triu(1)
    causal_float = torch.zeros(12, 12, dtype=torch.float64).masked_fill(causal_bool, float("-inf"))
    expected, _ = m(x, x, x, is_causal=True)
    torch.testing.assert_close(m(x, x, x, attn_mask=causal_bool)[0], expected)
    torch.testing.assert_close(m(x, x, x, attn_mask=causal_float)[0], expected)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(12, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(4, 12, 12, dtype=torch.bool))


def test_need_weights_warns_and_returns_none():
    m = MultiheadDilatedAttention(32, 4, segment_lengths=[8], dilation_rates=[1])
    x = torch.randn(1, 8, 32)
    with pytest.warns(UserWarning, match="need_weights"):
        _, w = m(x, x, x, need_weights=True)
    assert w is None


def test_multihead_rejects_wrong_input_shape():
    m = MultiheadDilatedAttention(32, 4, segment_lengths=[8], dilation_rates=[1])
    with pytest.raises(ValueError, match="embed_dim=32"):
        m(torch.randn(1, 8, 16), torch.randn(1, 8, 16), torch.randn(1, 8, 16))


def test_multihead_trains(device):
    torch.manual_seed(0)
    m = MultiheadDilatedAttention(32, 4, segment_lengths=[8, 16], dilation_rates=[1, 2], device=device)
    x = torch.randn(2, 32, 32, device=device)
    target = torch.randn(2, 32, 32, device=device)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(m(x, x, x, is_causal=True)[0], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_multihead_receives_its_core():
    """``attention=``: a built core (which brings its settings) or a class that builds one; by default the
    class's ``attention_class``. No module builds its core before ``super().__init__``."""
    from dilated_attention_pytorch import ImprovedDilatedAttention, ImprovedMultiheadDilatedAttention

    torch.manual_seed(0)
    core = DilatedAttention([8, 16], [1, 2], offsets="torchscale")
    given = MultiheadDilatedAttention(32, 4, attention=core, dtype=torch.float64)
    torch.manual_seed(0)
    built = MultiheadDilatedAttention(32, 4, segment_lengths=[8, 16], dilation_rates=[1, 2], offsets="torchscale",
                                      dtype=torch.float64)
    assert given.attention is core and built.attention.config == core.config
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    torch.testing.assert_close(given(x, x, x, is_causal=True)[0], built(x, x, x, is_causal=True)[0], atol=0, rtol=0)
    by_class = MultiheadDilatedAttention(32, 4, segment_lengths=[8], dilation_rates=[1], attention=ImprovedDilatedAttention)
    assert type(by_class.attention) is ImprovedDilatedAttention and by_class.attention.config.backend == "auto"
    assert ImprovedMultiheadDilatedAttention.attention_class is ImprovedDilatedAttention
    with pytest.raises(TypeError, match="attention= is a module with its own settings"):
        MultiheadDilatedAttention(32, 4, segment_lengths=[8], dilation_rates=[1], attention=core)
    with pytest.raises(TypeError, match="segment_lengths and dilation_rates are required"):
        MultiheadDilatedAttention(32, 4)
    with pytest.raises(TypeError, match="attention must be a BaseDilatedAttention"):
        MultiheadDilatedAttention(32, 4, attention=torch.nn.Identity())
    with pytest.raises(ValueError, match="offsets"):  # a given core's offsets are checked against the heads
        MultiheadDilatedAttention(32, 4, attention=DilatedAttention([8], [2], offsets=[[0, 1, 0]]))
