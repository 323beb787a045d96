"""block_sparse_attention against the dense float64 masked reference: forward, LSE, gradients."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tensors import rand_qkv, rel_err
from dilated_attention_pytorch.block_sparse import block_sparse_attention, block_sparse_backend
from dilated_attention_pytorch.block_sparse.functional import plan_for_layout
from dilated_attention_pytorch.block_sparse.reference import reference_block_sparse_attention


def random_block_layout(h, nb, density=0.4, empty_row=True):
    layout = torch.rand(h, nb, nb) < density
    if empty_row:
        layout[0, nb // 2] = False  # a query block that sees nothing
    return layout


def run_both(q, k, v, layout, bs, causal, with_lse=True):
    out, lse = block_sparse_attention(q, k, v, layout, block_size=bs, is_causal=causal, return_lse=True)
    ref, ref_lse = reference_block_sparse_attention(q, k, v, layout, block_size=bs, is_causal=causal)
    g_out = torch.randn_like(ref)
    g_lse = torch.randn_like(ref_lse) if with_lse else torch.zeros_like(ref_lse)
    finite = torch.isfinite(ref_lse)
    loss = (out.double() * g_out).sum()
    ref_loss = (ref * g_out).sum()
    if with_lse:  # the gradient through the LSE is checked too
        loss = loss + (torch.where(finite, lse.double(), 0.0) * g_lse).sum()
        ref_loss = ref_loss + (torch.where(finite, ref_lse, 0.0) * g_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    return (out, lse, grads), (ref, ref_lse, ref_grads)


@pytest.mark.parametrize(
    "n,bs,h,h_kv,causal",
    [
        (32, 8, 2, 2, False),
        (37, 8, 4, 2, True),  # n % bs != 0, GQA, causal
        (33, 5, 3, 1, False),  # multi-query
        (50, 16, 2, 1, True),
        (7, 16, 2, 2, False),  # one block larger than the sequence
        (24, 1, 2, 2, True),  # token-level layout
    ],
)
@pytest.mark.parametrize("with_lse", [False, True])
def test_matches_reference_float64(n, bs, h, h_kv, causal, with_lse):
    nb = -(-n // bs)
    layout = random_block_layout(h, nb)
    q, k, v = rand_qkv(2, n, h, h_kv, 8)
    (out, lse, grads), (ref, ref_lse, ref_grads) = run_both(q, k, v, layout, bs, causal, with_lse)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64 and lse.shape == (2, h, n)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-12, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-9)


def test_shared_layout_broadcasts_over_heads():
    q, k, v = rand_qkv(1, 40, 4, 2, 8)
    layout = random_block_layout(1, 5, empty_row=False)
    (out, _, grads), (ref, _, ref_grads) = run_both(q, k, v, layout, 8, False)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-9)


def test_one_joint_softmax_not_per_block():
    """A dense layout equals plain softmax attention over all keys (a per-block-softmax sum would not)."""
    q, k, v = rand_qkv(2, 30, 2, 2, 8, requires_grad=False)
    out = block_sparse_attention(q, k, v, torch.ones(1, 4, 4, dtype=torch.bool), block_size=8)
    expected = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-12, rtol=1e-10)


def test_empty_rows_zero_output_no_grad_no_nan():
    q, k, v = rand_qkv(1, 16, 2, 2, 4)
    layout = torch.zeros(2, 4, 4, dtype=torch.bool)
    layout[1, 2, 0] = True
    out, lse = block_sparse_attention(q, k, v, layout, block_size=4, return_lse=True)
    assert torch.all(out[:, :, 0] == 0) and torch.all(torch.isneginf(lse[:, 0]))
    assert torch.all(out[:, :8, 1] == 0) and torch.all(out[:, 12:, 1] == 0)
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, 0] == 0) and torch.all(k.grad[:, 4:, :] == 0)


def test_all_empty_layout_gives_zeros():
    q, k, v = rand_qkv(1, 9, 2, 1, 4)
    out = block_sparse_attention(q, k, v, torch.zeros(1, 3, 3, dtype=torch.bool), block_size=3)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.all(q.grad == 0) and torch.all(k.grad == 0) and torch.all(v.grad == 0)


def test_gradcheck_tiny():
    q, k, v = rand_qkv(1, 6, 2, 1, 3)
    layout = torch.tensor([[[True, False, True], [False, False, False], [True, True, False]],
                           [[False, True, False], [True, True, True], [False, False, True]]])

    def f(q, k, v):
        out, lse = block_sparse_attention(q, k, v, layout, block_size=2, is_causal=True, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_error_close_to_plain_pytorch(dtype):
    """The error of our path in low precision is within 2x that of dense masked attention in that dtype."""
    q, k, v = rand_qkv(2, 64, 4, 2, 16, requires_grad=False)
    layout = random_block_layout(4, 8, empty_row=False)
    ref, _ = reference_block_sparse_attention(q, k, v, layout, block_size=8, is_causal=True)
    ql, kl, vl = (x.to(dtype) for x in (q, k, v))
    ours = block_sparse_attention(ql, kl, vl, layout, block_size=8, is_causal=True)
    assert ours.dtype == dtype
    mask = torch.ones(64, 64, dtype=torch.bool).tril() & layout.repeat_interleave(8, 1).repeat_interleave(8, 2)
    plain = torch.nn.functional.scaled_dot_product_attention(
        ql.transpose(1, 2), kl.repeat_interleave(2, 2).transpose(1, 2), vl.repeat_interleave(2, 2).transpose(1, 2),
        attn_mask=mask,
    ).transpose(1, 2)
    assert rel_err(ours, ref) <= 2 * rel_err(plain, ref) + 1e-6


def test_plan_is_proportional_to_active_blocks():
    layout = torch.zeros(2, 8, 8, dtype=torch.bool)
    layout[0, :, 0] = True
    layout[1, 3, :] = True
    plan = plan_for_layout(layout, 2, 64, 8, False)
    assert plan.active_blocks == 16 == sum(c.heads.numel() for c in plan.calls)
    for call in plan.calls:  # a row appears at most once per call (the merge relies on it)
        rows = call.heads * 8 + call.q_blocks
        assert rows.unique().numel() == rows.numel()
    causal = plan_for_layout(layout, 2, 64, 8, True)
    assert causal.active_blocks == 8 + 4  # blocks above the diagonal are dropped


def test_validation_errors():
    q, k, v = rand_qkv(1, 16, 2, 2, 4, requires_grad=False)
    ok = torch.ones(2, 4, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="layout must have dtype torch.bool"):
        block_sparse_attention(q, k, v, ok.int(), block_size=4)
    with pytest.raises(ValueError, match=r"= \(2 or 1, 4, 4\) for seq=16"):
        block_sparse_attention(q, k, v, ok[:, :3], block_size=4)
    with pytest.raises(ValueError, match=r"= \(2 or 1, 2, 2\) for seq=16, block_size=8"):
        block_sparse_attention(q, k, v, ok, block_size=8)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        block_sparse_attention(q, k, v, ok, block_size=0)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        block_sparse_attention(q, k, v, ok, block_size=4, is_causal=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(q, k, v, ok, block_size=4, backend="cutlass")
    with pytest.raises(ValueError, match="backend='flex' cannot run these inputs: runs on cuda only"):
        block_sparse_attention(q, k, v, ok, block_size=4, backend="flex")


def test_backend_choice_on_cpu():
    q = torch.randn(1, 256, 2, 64)
    assert block_sparse_backend(q, 128) == "portable"


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed):
    gen = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    h_kv = pick(1, 2)
    h = h_kv * pick(1, 3)
    bs = pick(1, 9)
    n = pick(1, 40)
    nb = -(-n // bs)
    heads = h if pick(0, 1) else 1
    layout = torch.rand(heads, nb, nb, generator=gen) < torch.rand(1, generator=gen).item()
    causal = bool(pick(0, 1))
    q, k, v = rand_qkv(pick(1, 2), n, h, h_kv, pick(1, 9), generator=gen)
    (out, lse, grads), (ref, ref_lse, ref_grads) = run_both(q, k, v, layout, bs, causal)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-9)


def test_layout_edited_in_place_is_seen():
    """Metadata is keyed by the layout's content, not its identity."""
    q, k, v = rand_qkv(1, 16, 2, 2, 4, requires_grad=False)
    layout = torch.ones(2, 4, 4, dtype=torch.bool)
    block_sparse_attention(q, k, v, layout, block_size=4)
    layout[1, :, 1:] = False
    ref, _ = reference_block_sparse_attention(q, k, v, layout, block_size=4)
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout, block_size=4), ref, atol=1e-12, rtol=1e-10)
