"""ImprovedDilatedAttention / ImprovedMultiheadDilatedAttention: same results, lossless conversion."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.tensors import rand_qkv
from dilated_attention_pytorch import ImprovedDilatedAttention, ImprovedMultiheadDilatedAttention, MultiheadDilatedAttention
from dilated_attention_pytorch.reference import reference_dilated_attention


def test_improved_matches_reference_and_explains(device):
    q, k, v = rand_qkv(1, 50, 4, 2, 8, device=device)
    m = ImprovedDilatedAttention([16, 32], [1, 2])
    out = m(q, k, v, is_causal=True)
    ref, _ = reference_dilated_attention(q, k, v, [16, 32], [1, 2], is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    choice = m.explain(q)
    assert choice.backend == "portable"  # float64 is not for the fused kernels
    assert any("float16 or bfloat16" in r for r in choice.fused_reasons["cudnn"])


@pytest.mark.parametrize("num_kv_heads,bias,layer_norm", [(None, True, True), (2, False, True), (4, True, False)])
def test_conversion_is_lossless(num_kv_heads, bias, layer_norm):
    torch.manual_seed(0)
    kw = dict(segment_lengths=[8, 16], dilation_rates=[1, 2], num_kv_heads=num_kv_heads, bias=bias,
              layer_norm=layer_norm, dtype=torch.float64)
    m = MultiheadDilatedAttention(64, 8, **kw)
    for p in m.parameters():  # move away from the init so that a wrong copy would show
        p.data.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 33, 64, dtype=torch.float64)
    y = torch.randn(2, 33, 64, dtype=torch.float64)
    fused = ImprovedMultiheadDilatedAttention.from_multihead(m)
    back = fused.to_multihead()
    for mod in (fused, back):
        torch.testing.assert_close(mod(x, x, x, is_causal=True)[0], m(x, x, x, is_causal=True)[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(mod(x, y, y)[0], m(x, y, y)[0], atol=1e-12, rtol=0)
    for name, t in m.state_dict().items():
        assert torch.equal(back.state_dict()[name], t)


def test_fused_init_statistics():
    torch.manual_seed(0)
    m = ImprovedMultiheadDilatedAttention(512, 8, segment_lengths=[64], dilation_rates=[1], gamma_init=0.5)
    w_q, w_k, w_v = m.qkv_proj.weight.split([512, 512, 512])
    xavier = math.sqrt(2.0 / (512 + 512))
    for w, gain in ((w_q, 1.0), (w_k, 1.0), (w_v, 0.5)):
        assert abs(w.std().item() / (gain * xavier) - 1) < 0.02
    assert torch.all(m.qkv_proj.bias == 0)


def test_from_multihead_rejects_other_modules():
    with pytest.raises(TypeError, match="MultiheadDilatedAttention"):
        ImprovedMultiheadDilatedAttention.from_multihead(torch.nn.Linear(2, 2))
