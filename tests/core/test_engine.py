"""The block engine's sequence chunking and backend choice."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tensors import rand_qkv
from dilated_attention_pytorch import dilated_attention, explain_backend
from dilated_attention_pytorch.engine import EngineOptions, run_engine
from dilated_attention_pytorch.planning import chunk_bounds, plan_blocks
from dilated_attention_pytorch.kernels import CpuFlashKernel, MathKernel
from dilated_attention_pytorch.reference import reference_dilated_attention


@pytest.mark.parametrize(
    "n,segments,target,expected",
    [
        (40, (4, 8), 16, [(0, 16), (16, 32), (32, 40)]),
        (40, (4, 6), 16, [(0, 12), (12, 24), (24, 36), (36, 40)]),
        (40, (7, 9), 16, [(0, 40)]),  # lcm 63 > n: one chunk
        (10, (16,), 4, [(0, 10)]),
    ],
)
def test_chunk_bounds(n, segments, target, expected):
    assert chunk_bounds(n, segments, target) == expected


@pytest.mark.parametrize("kernel", [CpuFlashKernel(), MathKernel()], ids=lambda k: k.name)
@pytest.mark.parametrize("is_causal", [False, True])
def test_chunked_engine_matches_reference(kernel, is_causal):
    n, ws, rs = 45, (4, 8, 12), (1, 2, 3)
    q, k, v = rand_qkv(2, n, 6, 3, 8)
    mask = torch.rand(2, n) < 0.3
    opts = EngineOptions(ws, rs, "paper", False, is_causal, 0.3, 0.0, kernel, chunk_tokens=24)
    out, lse = run_engine(q, k, v, ~mask, opts)
    ref, ref_lse = reference_dilated_attention(q, k, v, ws, rs, is_causal=is_causal, scale=0.3, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse.transpose(1, 2), ref_lse, atol=1e-10, rtol=0)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_explain_backend_on_cpu_gives_reasons():
    q = torch.randn(1, 8, 2, 4)
    choice = explain_backend(q)
    assert choice.backend == "portable" and choice.kernel.name == "cpu_flash"
    assert any("cuda" in r for r in choice.fused_reasons["cudnn"])
    assert "fused path not used" in str(choice)
    with pytest.raises(ValueError, match="backend='fused' cannot run"):
        dilated_attention(q, q, q, [4], [1], backend="fused")
    assert explain_backend(q, dropout_p=0.1).kernel.name == "math"


@pytest.mark.parametrize("n", [64, 72, 70, 5])
@pytest.mark.parametrize("is_causal", [False, True])
def test_diagonal_blocks_match_reference(n, is_causal):
    """'paper' offsets with h / r < r run as diagonal blocks (row offset and head advance together)."""
    ws, rs = (16, 32, 8), (4, 8, 2)
    blocks = plan_blocks(n, 8, 8, tuple(min(w, n) for w in ws), rs, "paper", False, diagonal_blocks=True)
    assert any(b.diag_m is not None for b in blocks) == (n >= 8)
    q, k, v = rand_qkv(2, n, 8, 8, 4)
    out, lse = dilated_attention(q, k, v, ws, rs, is_causal=is_causal, return_lse=True)
    ref, ref_lse = reference_dilated_attention(q, k, v, ws, rs, is_causal=is_causal)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


@pytest.mark.parametrize("h, n", [(3, 96), (5, 70), (2, 64)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_one_diagonal_block_when_fewer_heads_than_dilation(h, n, is_causal):
    """With h < r, head j has offset j ('paper'): one diagonal block of all h heads replaces h calls;
    rows of offsets >= h are covered by no head of that pattern."""
    ws, rs = (8, 32, 64), (1, 8, 16)
    blocks = plan_blocks(n, h, h, tuple(min(w, n) for w in ws), rs, "paper", False, diagonal_blocks=True)
    diagonal = [b for b in blocks if b.diag_m is not None]
    assert diagonal and all(b.heads == slice(0, h) for b in diagonal)
    q, k, v = rand_qkv(2, n, h, h, 8)
    out, lse = dilated_attention(q, k, v, ws, rs, is_causal=is_causal, return_lse=True)
    ref, ref_lse = reference_dilated_attention(q, k, v, ws, rs, is_causal=is_causal)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=0)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


MERGE_CASES = [
    # (n, h, h_kv, ws, rs, offsets, head_groups)
    (64, 8, 8, (16, 32, 8), (4, 8, 2), "paper", False),  # diagonal blocks
    (70, 4, 2, (16, 32), (1, 3), "paper", False),  # tails, GQA
    (37, 6, 3, (8, 16, 32), (1, 2, 4), "torchscale", True),
    (20, 4, 4, (8,), (2,), "group", False),  # rows nobody covers
    (3, 4, 1, (8, 16), (4, 8), "paper", False),  # n < r
    (150, 4, 2, (48, 100), (3, 5), "paper", False),  # segments longer than the merge's 32 tokens per
    # program, not multiples of it: one segment boundary inside a program's tokens, w % r != 0
    (200, 6, 6, (64, 40, 200), (1, 4, 7), "torchscale", False),  # a tail, both branches of the merge
]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf in the interpreter
@pytest.mark.parametrize("case", MERGE_CASES)
def test_triton_gather_merge_matches_reference(case, is_causal):
    """The fused path's Triton gather kernel (forward merge) and input-dtype gradient accumulation,
    driven by the CPU block kernel (Triton's interpreter on CPU, the real kernel on GPU)."""
    pytest.importorskip("triton")
    n, h, h_kv, ws, rs, offsets, hg = case
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernel = CpuFlashKernel() if device == "cpu" else MathKernel()
    q, k, v = rand_qkv(2, n, h, h_kv, 16, dtype=torch.float32, device=device)
    seg = tuple(min(w, n) for w in ws)
    for merge, in_dtype in (("triton", True), ("torch", True)):
        opts = EngineOptions(seg, rs, offsets, hg, is_causal, 0.25, 0.0, kernel, chunk_tokens=32, merge=merge,
                             grads_in_input_dtype=in_dtype)
        out, lse = run_engine(q, k, v, None, opts)
        ref, ref_lse = reference_dilated_attention(q, k, v, ws, rs, is_causal=is_causal, scale=0.25,
                                                   offsets=offsets, head_groups=hg)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse.transpose(1, 2)), finite)
        torch.testing.assert_close(lse.transpose(1, 2)[finite].double(), ref_lse[finite], atol=2e-5, rtol=0)
        g = torch.randn_like(ref)
        grads = torch.autograd.grad((out.double() * g).sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", MERGE_CASES)
def test_backward_in_pieces_matches_reference(case):
    """Backward cut into pieces of segments and heads (bounded temporaries) is still exact."""
    n, h, h_kv, ws, rs, offsets, hg = case
    q, k, v = rand_qkv(2, n, h, h_kv, 8)
    mask = torch.rand(2, n) < 0.2
    seg = tuple(min(w, n) for w in ws)
    for key_valid in (None, ~mask):
        opts = EngineOptions(seg, rs, offsets, hg, True, 0.25, 0.0, CpuFlashKernel(), chunk_tokens=32,
                             piece_token_heads=8)
        out, _ = run_engine(q, k, v, key_valid, opts)
        ref, _ = reference_dilated_attention(q, k, v, ws, rs, is_causal=True, scale=0.25, offsets=offsets,
                                             head_groups=hg, key_padding_mask=None if key_valid is None else mask)
        g = torch.randn_like(ref)
        grads = torch.autograd.grad((out * g).sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


@pytest.mark.parametrize("n,h,h_kv", [(96, 8, 8), (70, 6, 2), (5, 4, 4)])
def test_remembered_views_equal_the_view_chains(n, h, h_kv):
    """A view chain remembered as one ``as_strided`` gives the chain's tensor (values and strides) on
    other tensors of the same shape and stride: other storage, other storage offsets (later chunks),
    non-contiguous inputs; chains that copy (GQA head lists) are rebuilt each time."""
    from dilated_attention_pytorch.views import Rows, _memo, _view, to_kernel

    ws, rs = (16, 32, 12), (1, 4, 3)
    blocks = plan_blocks(n, h, h_kv, tuple(min(w, n) for w in ws), rs, "paper", False, diagonal_blocks=h == h_kv)
    remembered = len(_memo._specs)
    for trial in range(4):  # the first call of a layout builds and remembers, the second uses the memo
        base = torch.randn(1, n + 7, h_kv, 16)
        x = base[:, 7 - trial :][:, :n] if trial < 2 else torch.randn(1, h_kv, n, 16).transpose(1, 2)
        for block in blocks:
            for index in (block.kv_heads, block.heads)[: 1 if h != h_kv else 2]:
                got, want = Rows(block, index).read(x), to_kernel(_view(x, block, index))
                assert got.shape == want.shape and got.stride() == want.stride()
                assert torch.equal(got, want)
                piece = (0, block.span.count, 0, len(block.head_list(h)))
                got_p = Rows(block, index, piece).read(x)
                want_p = to_kernel(_view(x, block, index)[:, 0 : piece[1], :, 0 : piece[3]])
                assert torch.equal(got_p, want_p)
    assert len(_memo._specs) > remembered  # the memo was used, not only the chains


def test_chunks_of_a_batch_run_on_views_of_the_inputs():
    """A chunked sequence with several batch entries runs one entry per chunk, so that every block
    kernel reads strided views of q, k, v (no gather copies), and the result is still exact."""
    seen = []

    class Recording(CpuFlashKernel):
        def forward(self, q, k, v, **kw):
            seen.append(all(t.untyped_storage().data_ptr() == s for t, s in zip((q, k, v), storages)))
            return super().forward(q, k, v, **kw)

    n, ws, rs = 96, (16, 32), (1, 2)
    q, k, v = rand_qkv(3, n, 4, 4, 8)
    storages = [t.untyped_storage().data_ptr() for t in (q, k, v)]
    opts = EngineOptions(ws, rs, "paper", False, True, 0.3, 0.0, Recording(), chunk_tokens=32)
    out, lse = run_engine(q, k, v, None, opts)
    assert seen and all(seen)
    ref, ref_lse = reference_dilated_attention(q, k, v, ws, rs, is_causal=True, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse.transpose(1, 2), ref_lse, atol=1e-10, rtol=0)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
