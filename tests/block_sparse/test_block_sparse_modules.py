"""Block-sparse modules and the factory: same results as the functional form, checked arguments."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tensors import rand_qkv
from dilated_attention_pytorch.block_sparse import (
    BlockSparseRingDilatedAttention,
    BlockSparseRingDistributedDilatedAttention,
    BlockSparseRingMultiheadDilatedAttention,
    SparsePatternConfig,
    create_block_sparse_attention,
    dilated_layout,
)
from dilated_attention_pytorch.block_sparse.reference import reference_block_sparse_attention


def test_module_default_is_dilated_layout_and_matches_reference():
    module = BlockSparseRingDilatedAttention([8, 16], [1, 2], block_size=4)
    q, k, v = rand_qkv(2, 30, 4, 2, 8)
    out = module(q, k, v, is_causal=True)
    layout = dilated_layout(8, 4, [2, 4], [1, 2])
    assert torch.equal(module.layout(30, 4, q.device), layout)
    ref, _ = reference_block_sparse_attention(q, k, v, layout, block_size=4, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_module_with_config_and_scale():
    cfg = SparsePatternConfig("global_local", window=1, global_blocks=1)
    module = BlockSparseRingDilatedAttention([8], [1], softmax_scale=0.3, sparse_config=cfg, block_size=4)
    q, k, v = rand_qkv(1, 24, 2, 2, 8, requires_grad=False)
    ref, _ = reference_block_sparse_attention(q, k, v, cfg.build(24, 2, 4), block_size=4, scale=0.3)
    torch.testing.assert_close(module(q, k, v), ref, atol=1e-12, rtol=1e-10)


def test_module_rejects_what_it_cannot_honour():
    with pytest.raises(ValueError, match="attention_dropout must be 0.0"):
        BlockSparseRingDilatedAttention([8], [1], attention_dropout=0.1)
    with pytest.raises(TypeError, match="sparse_config must be a SparsePatternConfig"):
        BlockSparseRingDilatedAttention([8], [1], sparse_config="local")
    module = BlockSparseRingDilatedAttention([8], [1], block_size=4)
    q, k, v = rand_qkv(1, 8, 2, 2, 4, requires_grad=False)
    with pytest.raises(ValueError, match="key_padding_mask is not supported"):
        module(q, k, v, key_padding_mask=torch.zeros(1, 8, dtype=torch.bool))


def test_multihead_forward_backward_and_gqa():
    torch.manual_seed(0)
    mha = BlockSparseRingMultiheadDilatedAttention(
        32, 4, segment_lengths=[8, 16], dilation_rates=[1, 2], num_kv_heads=2, block_size=4, dtype=torch.float64,
        sparse_config=SparsePatternConfig("local", window=1),
    )
    x = torch.randn(2, 22, 32, dtype=torch.float64, requires_grad=True)
    out, weights = mha(x, x, x, is_causal=True)
    assert out.shape == (2, 22, 32) and weights is None
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and mha.q_proj.weight.grad.abs().sum() > 0
    # the attention core equals the reference on the projected inputs
    q = mha.q_proj(x).unflatten(-1, (4, 8))
    k = mha.k_proj(x).unflatten(-1, (2, 8))
    v = mha.v_proj(x).unflatten(-1, (2, 8))
    layout = SparsePatternConfig("local", window=1).build(22, 4, 4)
    ref, _ = reference_block_sparse_attention(q, k, v, layout, block_size=4, is_causal=True)
    expected = mha.out_proj(mha.norm(ref.flatten(2)))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)


def test_factory():
    m = create_block_sparse_attention([8], [1], block_size=4)
    assert isinstance(m, BlockSparseRingDilatedAttention) and m.block_size == 4
    mh = create_block_sparse_attention(16, 2, multihead=True, segment_lengths=[8], dilation_rates=[1],
                                       block_size=4, bias=False)
    assert isinstance(mh, BlockSparseRingMultiheadDilatedAttention) and mh.q_proj.bias is None
    d = create_block_sparse_attention(segment_lengths=[8], dilation_rates=[1], block_size=4, distributed=True)
    assert isinstance(d, BlockSparseRingDistributedDilatedAttention)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['sparsity_ratio'\]; accepted: .*block_size"):
        create_block_sparse_attention([8], [1], sparsity_ratio=0.1)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['foo'\]; accepted: .*layer_norm_eps"):
        create_block_sparse_attention(16, 2, multihead=True, segment_lengths=[8], dilation_rates=[1], foo=1)
    with pytest.raises(ValueError, match="choose one"):
        create_block_sparse_attention(multihead=True, distributed=True)
