"""Pattern builders: their defining properties, LongNet at block granularity, SparsePatternConfig."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tensors import rand_qkv
from dilated_attention_pytorch.block_sparse import (
    SparsePatternConfig,
    adaptive_layout,
    block_sparse_attention,
    dilated_layout,
    global_local_layout,
    hierarchical_layout,
    layout_density,
    layout_from_mask_mod,
    local_window_layout,
    random_layout,
    strided_layout,
)
from dilated_attention_pytorch.block_sparse.config import PATTERNS
from dilated_attention_pytorch.block_sparse.reference import layout_to_token_mask, reference_block_sparse_attention
from dilated_attention_pytorch.reference import count_matrix, reference_dilated_attention

I = torch.arange(12)[:, None]
J = torch.arange(12)[None, :]


def test_local_window():
    layout = local_window_layout(12, 2)
    assert layout.shape == (1, 12, 12) and layout.dtype == torch.bool
    assert torch.equal(layout[0], (I - J).abs() <= 2)
    assert torch.equal(local_window_layout(5, 0)[0], torch.eye(5, dtype=torch.bool))


@pytest.mark.parametrize(
    "nb,h,ws,rs,offsets,head_groups",
    [
        (12, 4, [4, 8], [1, 2], "paper", False),
        (13, 3, [4, 6, 16], [1, 2, 4], "torchscale", False),  # last segment shorter, W > nb
        (10, 6, [2, 5], [1, 3], "group", True),
        (9, 2, [9], [3], [[2, 0]], False),
    ],
)
def test_dilated_is_longnet_count_matrix_on_blocks(nb, h, ws, rs, offsets, head_groups):
    layout = dilated_layout(nb, h, ws, rs, offsets=offsets, head_groups=head_groups)
    expected = count_matrix(nb, h, ws, rs, offsets, head_groups) > 0
    assert torch.equal(layout, expected)


def test_dilated_block_size_one_equals_longnet_attention():
    """With one pattern (counts 0/1) and block_size 1, block-sparse attention IS LongNet attention."""
    n, h = 23, 4
    q, k, v = rand_qkv(2, n, h, 2, 8)
    layout = dilated_layout(n, h, [8], [3])
    ours = block_sparse_attention(q, k, v, layout, block_size=1, is_causal=True)
    ref, _ = reference_dilated_attention(q, k, v, [8], [3], is_causal=True)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(ref)
    ours_g = torch.autograd.grad((ours * g).sum(), (q, k, v))
    ref_g = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_dilated_blocks_coincide_with_tokens_without_dilation():
    """For r = 1 the block pattern of segment w/bs blocks is the token pattern of segment w, at any bs."""
    n, bs, h = 40, 4, 2
    layout = SparsePatternConfig("dilated").build(n, h, bs, segment_lengths=[8, 16], dilation_rates=[1, 1])
    token = layout_to_token_mask(layout, n, bs, h, False)
    assert torch.equal(token, count_matrix(n, h, [8, 16], [1, 1]) > 0)


def test_global_local():
    layout = global_local_layout(12, 1, [0, 7])[0]
    assert layout[[0, 7]].all() and layout[:, [0, 7]].all()
    others = [i for i in range(12) if i not in (0, 7)]
    sub = layout[others][:, others]
    expected = ((I - J).abs() <= 1)[others][:, others]
    assert torch.equal(sub, expected)
    assert torch.equal(global_local_layout(12, 1, 2), global_local_layout(12, 1, [0, 1]))
    with pytest.raises(ValueError, match="global_blocks must be block indices in"):
        global_local_layout(4, 1, [4])


def test_strided():
    layout = strided_layout(12, 3, window=1)[0]
    assert torch.equal(layout, (((I - J) % 3) == 0) | ((I - J).abs() <= 1))


def test_random_is_seeded_and_has_density():
    a = random_layout(64, 0.2, num_heads=3, seed=7)
    assert torch.equal(a, random_layout(64, 0.2, num_heads=3, seed=7))
    assert not torch.equal(a, random_layout(64, 0.2, num_heads=3, seed=8))
    assert a.shape == (3, 64, 64) and a[:, range(64), range(64)].all()
    assert 0.18 < layout_density(a) < 0.24
    with pytest.raises(ValueError, match="density must be a float in"):
        random_layout(4, 1.5)


def test_hierarchical():
    layout = hierarchical_layout(12, [(1, 1), (2, 4)])[0]
    expected = ((I - J).abs() <= 1) | (((J % 4) == 0) & ((I - J).abs() <= 8))
    assert torch.equal(layout, expected)
    assert torch.equal(hierarchical_layout(12, [(2, 1)]), local_window_layout(12, 2))
    with pytest.raises(ValueError, match="levels"):
        hierarchical_layout(12, [])


def test_mask_mod_block_aligned_and_exact():
    n, bs = 30, 4

    def mask_mod(b, h, q_idx, kv_idx):  # block-aligned sliding window, causal
        return ((q_idx // bs - kv_idx // bs) <= 1) & (kv_idx <= q_idx)

    layout = layout_from_mask_mod(mask_mod, n, bs, is_causal=True)
    nb = -(-n // bs)
    i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    assert torch.equal(layout[0], (i - j <= 1) & (j <= i))
    # the layout with is_causal reproduces attention under the token-level mask_mod
    t = torch.arange(n)
    token = mask_mod(0, 0, t[:, None], t[None, :])
    assert torch.equal(layout_to_token_mask(layout, n, bs, 1, True)[0], token)


def test_mask_mod_not_block_aligned_raises():
    with pytest.raises(ValueError, match="not block-aligned for block_size=4"):
        layout_from_mask_mod(lambda b, h, q, kv: (q - kv).abs() <= 1, 16, 4)
    with pytest.raises(ValueError, match="not block-aligned"):  # causal pairs without is_causal=True
        layout_from_mask_mod(lambda b, h, q, kv: kv <= q, 16, 4)


def test_mask_mod_per_head():
    layout = layout_from_mask_mod(lambda b, h, q, kv: (h == 1) | (q // 4 == kv // 4), 12, 4, num_heads=2)
    assert torch.equal(layout[0], torch.eye(3, dtype=torch.bool)) and layout[1].all()


def brute_force_adaptive(q, k, bs, top_k, causal):
    b, n, h, d = q.shape
    nb = -(-n // bs)
    group = h // k.shape[2]
    layout = torch.zeros(h, nb, nb, dtype=torch.bool)
    for j in range(h):
        qp = torch.stack([q[:, i * bs : (i + 1) * bs, j].double().mean(dim=(0, 1)) for i in range(nb)])
        kp = torch.stack([k[:, i * bs : (i + 1) * bs, j // group].double().mean(dim=(0, 1)) for i in range(nb)])
        s = qp @ kp.T
        for i in range(nb):
            cand = list(range(i + 1)) if causal else list(range(nb))
            best = sorted(cand, key=lambda c: -s[i, c].item())[:top_k]
            layout[j, i, best] = True
            layout[j, i, i] = True
    return layout


@pytest.mark.parametrize("causal", [False, True])
def test_adaptive_top_k_rule(causal):
    q, k, _ = rand_qkv(2, 45, 4, 2, 8, requires_grad=False)
    layout = adaptive_layout(q, k, 8, 2, is_causal=causal)
    assert torch.equal(layout, brute_force_adaptive(q, k, 8, 2, causal))
    counts = layout.sum(-1)
    assert counts.min() >= 1 and counts.max() <= 3


def test_adaptive_gradients_flow_through_kept_blocks():
    q, k, v = rand_qkv(1, 32, 2, 2, 8)
    cfg = SparsePatternConfig("adaptive", top_k=2)
    layout = cfg.build(32, 2, 8, query=q, key=k)
    assert not layout.requires_grad
    ours = block_sparse_attention(q, k, v, layout, block_size=8)
    ref, _ = reference_block_sparse_attention(q, k, v, layout, block_size=8)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((ours * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)
        assert a.abs().sum() > 0


@pytest.mark.parametrize("pattern", PATTERNS)
def test_config_builds_every_pattern(pattern):
    extra = {}
    if pattern == "mask_mod":
        extra["mask_mod"] = lambda b, h, q, kv: q // 4 == kv // 4
    if pattern == "layout":
        extra["layout"] = torch.ones(1, 4, 4, dtype=torch.bool)
    cfg = SparsePatternConfig(pattern, **extra)
    q, k, _ = rand_qkv(1, 16, 2, 2, 4, requires_grad=False)
    layout = cfg.build(16, 2, 4, segment_lengths=[8], dilation_rates=[2], query=q, key=k)
    assert layout.dtype == torch.bool and layout.shape[1:] == (4, 4) and layout.shape[0] in (1, 2)


def test_config_errors():
    with pytest.raises(ValueError, match="pattern must be one of"):
        SparsePatternConfig("butterfly")
    with pytest.raises(ValueError, match="multiples of block_size=4"):
        SparsePatternConfig("dilated", segment_lengths=[6], dilation_rates=[1]).build(16, 2, 4)
    with pytest.raises(ValueError, match="needs mask_mod"):
        SparsePatternConfig("mask_mod")
    with pytest.raises(ValueError, match="needs the query and key"):
        SparsePatternConfig("adaptive").build(16, 2, 4)
    with pytest.raises(ValueError, match="window must be >= 0"):
        SparsePatternConfig("local", window=-1)
