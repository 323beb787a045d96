"""The GPU path's layout -> FlexAttention BlockMask conversion, checked on CPU.

torch's FlexAttention has no CPU backward and its CPU eager mode materialises the dense scores, so the
fused GPU kernel itself is checked by benchmarks/block_sparse_bench.py on a GPU. Here: the block mask's
full/partial block lists equal the layout, and FlexAttention's own (eager) forward with that block mask
matches the float64 reference, which checks the mask_mod it carries.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.attention import flex_attention

from tests.helpers.tensors import rand_qkv
from dilated_attention_pytorch.block_sparse.flex import flex_reasons, layout_block_mask
from dilated_attention_pytorch.block_sparse.reference import reference_block_sparse_attention



def blocks_of(num, idx):
    """(1, H, nq) counts and (1, H, nq, nk) indices -> (H, nq, nk) bool."""
    h, nq, nk = idx.shape[1:]
    out = torch.zeros(h, nq, nk, dtype=torch.bool)
    for j in range(h):
        for i in range(nq):
            out[j, i, idx[0, j, i, : num[0, j, i]].long()] = True
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [1, 3])
def test_block_mask_lists_equal_layout(causal, heads):
    nb = 7
    layout = torch.rand(heads, nb, nb) < 0.4
    bm = layout_block_mask(layout, 7 * 16 - 5, 16, causal)
    assert bm.BLOCK_SIZE == (16, 16) and bm.seq_lengths == (107, 107)
    full = blocks_of(bm.full_kv_num_blocks, bm.full_kv_indices)
    partial = blocks_of(bm.kv_num_blocks, bm.kv_indices)
    i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    if causal:
        assert torch.equal(full, layout & (j < i)) and torch.equal(partial, layout & (j == i))
    else:
        assert torch.equal(full, layout) and not partial.any()
    # active indices come first and ascending (the order the kernel walks)
    for j_ in range(heads):
        for r in range(nb):
            k = int(bm.full_kv_num_blocks[0, j_, r])
            row = bm.full_kv_indices[0, j_, r, :k]
            assert torch.equal(row, row.sort().values)
    # the transposed (query-major) lists that the backward uses are derived from the same blocks
    assert torch.equal(bm.to_dense()[0].bool(), full | partial)


@pytest.mark.parametrize("causal", [False, True])
def test_flex_forward_matches_reference_on_cpu(causal):
    n, bs, h = 45, 16, 4
    nb = -(-n // bs)
    layout = torch.rand(h, nb, nb) < 0.5
    layout[1, 1] = False  # empty rows
    q, k, v = rand_qkv(2, n, h, 2, 8, requires_grad=False)
    bm = layout_block_mask(layout, n, bs, causal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile" (expected on CPU)
        out, aux = flex_attention.flex_attention(
            *(x.transpose(1, 2) for x in (q, k, v)), block_mask=bm, enable_gqa=True,
            return_aux=flex_attention.AuxRequest(lse=True),
        )
    ref, ref_lse = reference_block_sparse_attention(q, k, v, layout, block_size=bs, is_causal=causal)
    torch.testing.assert_close(out.transpose(1, 2), ref, atol=1e-12, rtol=1e-10)
    assert torch.equal(torch.isinf(aux.lse), torch.isinf(ref_lse))
    torch.testing.assert_close(aux.lse[torch.isfinite(ref_lse)], ref_lse[torch.isfinite(ref_lse)])


def test_flex_reasons():
    q = torch.randn(1, 256, 2, 64)
    reasons = flex_reasons(q, 64)
    assert any("cuda only" in r for r in reasons) and any("multiple of 128" in r for r in reasons)
    assert any("float16, bfloat16 or float32" in r for r in flex_reasons(q.double(), 128))
