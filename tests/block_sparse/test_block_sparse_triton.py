"""The Triton block-sparse kernels against the float64 reference: forward, LSE, gradients (through the
LSE too), awkward shapes, GQA, causal, empty rows, every load path (pointers and tensor descriptors),
the backward in one launch or two, block walks that start past their lists' first entries.

Without a GPU the kernels run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``) in float16:
the interpreter's bfloat16 matmul is broken (it returns garbage for ``tl.dot`` on bfloat16), so
bfloat16 runs only on a GPU. The error bound: within 2x that of plain dense masked SDPA in the same
dtype, against the same float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tensors import rand_qkv, rel_err

pytest.importorskip("triton")

from dilated_attention_pytorch.block_sparse import block_sparse_attention  # noqa: E402
from dilated_attention_pytorch.block_sparse.reference import (  # noqa: E402
    layout_to_token_mask,
    reference_block_sparse_attention,
)
from dilated_attention_pytorch.block_sparse.triton_path import (  # noqa: E402
    TileSettings,
    layout_lists,
    start_phases,
    tile_settings,
    triton_block_sparse_attention,
    triton_reasons,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def plain_attention(q, k, v, layout, block_size, causal):
    """The SPEC formula in plain PyTorch ops in the inputs' dtype -> (out, lse); rows that see nothing
    give zeros and LSE -inf."""
    n, h, d = q.shape[1], q.shape[2], q.shape[3]
    group = h // k.shape[2]
    mask = layout_to_token_mask(layout, n, block_size, h, causal)[None]
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2), v.repeat_interleave(group, 2).transpose(1, 2)
    scores = torch.where(mask, (qt @ kt.transpose(-1, -2)) * d**-0.5, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return (probs @ vt).transpose(1, 2), lse


CASES = [  # b, n, h, h_kv, d, causal, block_size, layout heads (h or 1), loads, gradient through the LSE
    (1, 300, 2, 1, 16, False, 128, "h", "pointers", False),  # n % block != 0, GQA
    (1, 300, 2, 1, 16, True, 128, "h", "descriptors-4d", True),  # causal, 4-d descriptors, LSE gradient
    (1, 384, 3, 3, 24, True, 256, "1", "pointers", False),  # head_dim not a power of 2, 2 tiles per block
    (1, 200, 4, 2, 40, False, 256, "h", "descriptors-4d", True),  # n < block, padded head dim
    (1, 1, 1, 1, 16, True, 128, "h", "pointers", True),  # n = 1
    (1, 300, 2, 2, 32, True, 128, "h", "descriptors-2d", True),  # 2-d descriptors, tail past the end
    (2, 256, 4, 2, 16, False, 128, "1", "descriptors-2d", False),  # 2-d descriptors over two batch entries
    (2, 200, 2, 1, 16, True, 128, "h", None, True),  # batch with a tail: the best loads allowed
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,h,h_kv,d,causal,bs,lh,loads,lse_grad", CASES)
def test_matches_reference(dtype, b, n, h, h_kv, d, causal, bs, lh, loads, lse_grad):
    check_against_reference(dtype, b, n, h, h_kv, d, causal, bs, lh, loads, lse_grad, None)


def with_backward(split_bwd: bool, align: bool = True) -> TileSettings:
    base = tile_settings(128, torch.device(DEVICE))
    return TileSettings(**{**base.__dict__, "split_bwd": split_bwd, "align": align})


BACKWARDS = {  # dK/dV and dQ programs in one launch or in two; walks from each list's first entry
    "one-launch": with_backward(False),
    "two-launches": with_backward(True),
    "unaligned": with_backward(True, align=False),
}


def test_start_phases_simulate_the_launch():
    # two slots; programs of work 1, 2, 1, 1 start at 0, 0, 1, 2; the mean work is 1.25
    phases = start_phases(torch.tensor([1.0, 2.0, 1.0, 1.0]), torch.zeros(4, dtype=torch.long), 2)
    assert torch.allclose(phases, torch.tensor([0.0, 0.0, 0.8, 0.6]))
    # equal work runs in plain waves: every program starts at its list's start
    assert (start_phases(torch.full((50,), 3.0), torch.zeros(50, dtype=torch.long), 8) == 0).all()
    # two kinds, each against its own mean: kind 1 (work 4) starts at 0 and 2 -> phases 0, 0.5
    phases = start_phases(torch.tensor([1.0, 4.0, 1.0, 4.0]), torch.tensor([0, 1, 0, 1]), 2)
    assert torch.allclose(phases, torch.tensor([0.0, 0.0, 0.0, 0.5]))


def test_start_phases_and_tile_settings_errors():
    one = torch.ones(3)
    with pytest.raises(ValueError, match="work must be a non-empty 1-d tensor"):
        start_phases(torch.ones(2, 2), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="kind must be an int64 tensor of work's shape"):
        start_phases(one, torch.zeros(2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="work must be finite and >= 0"):
        start_phases(torch.tensor([1.0, -1.0, 1.0]), torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="slots must be an int >= 1, but got 0"):
        start_phases(one, torch.zeros(3, dtype=torch.long), 0)
    base = tile_settings(128, torch.device(DEVICE)).__dict__
    with pytest.raises(ValueError, match="TileSettings.align must be a bool, but got 1"):
        TileSettings(**{**base, "align": 1})
    with pytest.raises(ValueError, match="TileSettings.bwd_stages must be an int >= 1, but got 0"):
        TileSettings(**{**base, "bwd_stages": 0})


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backward", ["one-launch", "two-launches"])
def test_walks_from_later_list_entries_cover_every_block(causal, backward):
    """Programs that start their walks past their lists' first entries (and wrap round) still see
    every block once: long lists and a launch simulated on two slots give such starts."""
    n, h, bs = 8 * 128 - 37, 2, 128
    tiles = BACKWARDS[backward]
    layout = (torch.rand(h, 8, 8) < 0.6).to(DEVICE)
    layout[:, range(8), range(8)] = True
    lists = layout_lists(layout, n, bs, causal)
    from dilated_attention_pytorch.block_sparse.triton_path import _bwd_phases, _fwd_phases

    dev = torch.device(DEVICE)
    rows = torch.arange(-(-n // tiles.fwd_m)) * tiles.fwd_m // bs
    firsts = (_fwd_phases(lists, 1, h, n, bs, tiles, dev).view(h, -1).cpu() * lists.kv_full_num[:, rows].cpu()).floor()
    bwd = _bwd_phases(lists, 1, h, 1, n, bs, tiles, "kv" if tiles.split_bwd else "both", dev)
    if DEVICE == "cpu":  # two slots: some walks start past entry 0
        assert firsts.max() >= 1 and bwd.max() > 0
    q, k, v = rand_qkv(1, n, h, 1, 16, device=DEVICE)
    ref, _ = reference_block_sparse_attention(q, k, v, layout, block_size=bs, is_causal=causal)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    ql, kl, vl = (x.detach().to(DTYPES[-1]).requires_grad_() for x in (q, k, v))
    out, _ = triton_block_sparse_attention(ql, kl, vl, layout, block_size=bs, is_causal=causal, scale=16**-0.5,
                                           tiles=tiles)
    grads = torch.autograd.grad(out, (ql, kl, vl), g.to(out.dtype))
    qp, kp, vp = (x.detach().to(DTYPES[-1]).requires_grad_() for x in (q, k, v))
    plain, _ = plain_attention(qp, kp, vp, layout, bs, causal)
    plain_grads = torch.autograd.grad(plain, (qp, kp, vp), g.to(plain.dtype))
    assert rel_err(out, ref) <= 2 * rel_err(plain, ref) + 1e-4
    for gr, r, p in zip(grads, ref_grads, plain_grads):
        assert rel_err(gr, r) <= 2 * rel_err(p, r) + 1e-4


@pytest.mark.parametrize("backward", ["one-launch", "unaligned"])  # the default: two launches, aligned
@pytest.mark.parametrize("b,n,h,h_kv,d,causal,bs,lh,loads,lse_grad", [CASES[1], CASES[2], CASES[6]])
def test_backward_variants_match_reference(backward, b, n, h, h_kv, d, causal, bs, lh, loads, lse_grad):
    check_against_reference(DTYPES[-1], b, n, h, h_kv, d, causal, bs, lh, loads, lse_grad, BACKWARDS[backward])


def check_against_reference(dtype, b, n, h, h_kv, d, causal, bs, lh, loads, lse_grad, tiles):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    nb = -(-n // bs)
    layout = torch.rand(h if lh == "h" else 1, nb, nb, generator=gen) < 0.6
    layout[:, range(nb), range(nb)] |= torch.rand(layout.shape[0], nb, generator=gen) < 0.8
    layout[:, 0, 0] = True  # some row sees keys
    if nb > 1:
        layout[0, nb - 1] = False  # a row of blocks that sees nothing
    layout = layout.to(DEVICE)
    q, k, v = rand_qkv(b, n, h, h_kv, d, device=DEVICE, generator=gen)
    ref, ref_lse = reference_block_sparse_attention(q, k, v, layout, block_size=bs, is_causal=causal)
    fin = torch.isfinite(ref_lse)
    g_out, g_lse = torch.randn_like(ref), torch.randn_like(ref_lse)

    def loss_of(out, lse):
        loss = (out.double() * g_out).sum()
        return loss + (torch.where(fin, lse.double(), 0.0) * g_lse).sum() if lse_grad else loss

    ref_grads = torch.autograd.grad(loss_of(ref, ref_lse), (q, k, v))
    ql, kl, vl = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = triton_block_sparse_attention(ql, kl, vl, layout, block_size=bs,
                                             is_causal=causal, scale=d**-0.5, loads=loads, tiles=tiles)
    grads = torch.autograd.grad(loss_of(out, lse), (ql, kl, vl))
    qp, kp, vp = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    plain, plain_lse = plain_attention(qp, kp, vp, layout, bs, causal)
    plain_grads = torch.autograd.grad(loss_of(plain, plain_lse), (qp, kp, vp))

    assert out.shape == (b, n, h, d) and lse.shape == (b, h, n) and lse.dtype == torch.float32
    assert rel_err(out, ref) <= 2 * rel_err(plain, ref) + 1e-4
    assert (lse.double() - ref_lse)[fin].abs().max() <= 2 * (plain_lse.double() - ref_lse)[fin].abs().max() + 1e-3
    assert torch.isneginf(lse[~fin]).all() and (out.transpose(1, 2)[~fin] == 0).all()
    for g, r, p in zip(grads, ref_grads, plain_grads):
        assert torch.isfinite(g).all()
        assert rel_err(g, r) <= 2 * rel_err(p, r) + 1e-4


def test_through_the_public_function():
    n, h, bs = 256, 2, 128
    layout = (torch.rand(h, 2, 2) < 0.7).to(DEVICE)
    q, k, v = rand_qkv(2, n, h, h, 32, dtype=torch.float16, device=DEVICE)
    out = block_sparse_attention(q, k, v, layout, block_size=bs, backend="triton")
    ref, _ = reference_block_sparse_attention(q, k, v, layout, block_size=bs)
    assert rel_err(out, ref) < 2e-3
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_gradients_are_bit_reproducible():
    """No atomics in the backward: two runs give bit-identical gradients, in one launch or two (the
    two differ from each other in the order of their sums: their walks start at other phases)."""
    n, h, bs = 384, 4, 128
    layout = (torch.rand(h, 3, 3) < 0.7).to(DEVICE)
    layout[:, 0, 0] = True
    q, k, v = rand_qkv(1, n, h, 2, 32, dtype=DTYPES[-1], device=DEVICE)
    g = torch.randn_like(q)

    def grads(tiles=None):
        out, _ = triton_block_sparse_attention(q, k, v, layout, block_size=bs, is_causal=True, scale=0.2, tiles=tiles)
        return torch.autograd.grad(out, (q, k, v), g)

    for tiles in (None, with_backward(False)):
        for first, second in zip(grads(tiles), grads(tiles)):
            assert torch.equal(first, second)


def test_lists_split_full_and_partial_blocks():
    layout = torch.rand(3, 5, 5) < 0.5
    lists = layout_lists(layout, 5 * 128 - 7, 128, True)
    i, j = torch.arange(5)[:, None], torch.arange(5)[None, :]
    active = layout & (j <= i)

    def dense(num, idx):
        out = torch.zeros(3, 5, 5, dtype=torch.bool)
        for hh in range(3):
            for r in range(5):
                out[hh, r, idx[hh, r, : num[hh, r]].long()] = True
        return out

    partial = active & ((j == i) | (j == 4))  # the diagonal, and the last key block (its keys end early)
    assert torch.equal(dense(lists.kv_part_num, lists.kv_part_idx), partial)
    assert torch.equal(dense(lists.kv_full_num, lists.kv_full_idx), active & ~partial)
    assert torch.equal(dense(lists.q_part_num, lists.q_part_idx), (active & (j == i)).transpose(1, 2))
    assert torch.equal(dense(lists.q_full_num, lists.q_full_idx), (active & (j != i)).transpose(1, 2))
    assert lists.active_blocks == int(active.sum())


def test_loads_errors():
    q = torch.randn(2, 200, 2, 24, dtype=torch.float16, device=DEVICE)
    layout = torch.ones(1, 2, 2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="loads must be None or one of"):
        triton_block_sparse_attention(q, q, q, layout, block_size=128, is_causal=False, scale=1.0, loads="tma")
    with pytest.raises(ValueError, match="loads='descriptors-2d' is not possible for these inputs"):
        triton_block_sparse_attention(q, q, q, layout, block_size=128, is_causal=False, scale=1.0, loads="descriptors-2d")


def test_reasons():
    q = torch.randn(1, 8, 2, 300, dtype=torch.float32)
    reasons = triton_reasons(q, 64)
    assert any("float16 or bfloat16" in r for r in reasons)
    assert any("multiple of 128" in r for r in reasons) and any("head_dim <= 256" in r for r in reasons)
    with pytest.raises(ValueError, match="backend='triton' cannot run these inputs: .*needs float16 or bfloat16"):
        block_sparse_attention(q[..., :16], q[..., :16], q[..., :16], torch.ones(1, 1, 1, dtype=torch.bool),
                               block_size=128, backend="triton")
