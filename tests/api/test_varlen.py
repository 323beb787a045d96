"""Variable-length inputs: packed documents (``cu_seqlens``) and per-row start positions
(``sequence_starts``) against a float64 reference run on each document alone."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from dilated_attention_pytorch import dilated_attention
from dilated_attention_pytorch.backends import choose_backend
from dilated_attention_pytorch.engine import EngineOptions, run_engine
from dilated_attention_pytorch.kernels import CpuFlashKernel
from dilated_attention_pytorch.reference import reference_dilated_attention

PATTERNS = [((4, 8, 16), (1, 2, 4)), ((5, 12), (1, 3)), ((8,), (2,))]


def random_lengths(rng: random.Random, count: int, longest: int) -> list[int]:
    """Fresh document lengths, with a length-1 document in most runs."""
    lengths = [rng.randint(1, longest) for _ in range(count)]
    if rng.random() < 0.7:
        lengths[rng.randrange(count)] = 1
    return lengths


def packed_inputs(lengths, h, h_kv, d):
    total = sum(lengths)
    q = torch.randn(total, h, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(total, h_kv, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(total, h_kv, d, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu


def per_document_reference(q, k, v, lengths, ws, rs, mask=None, **kw):
    """Each document through the reference alone (no other document's keys) -> out (total, h, d), lse (h, total)."""
    outs, lses, start = [], [], 0
    for n in lengths:
        part = [x[start:start + n].unsqueeze(0) for x in (q, k, v)]
        m = None if mask is None else mask[start:start + n].unsqueeze(0)
        out, lse = reference_dilated_attention(*part, ws, rs, key_padding_mask=m, **kw)
        outs.append(out[0])
        lses.append(lse[0])
        start += n
    return torch.cat(outs), torch.cat(lses, dim=1)


def loss_and_grads(out, lse, inputs, g_out, g_lse):
    finite = torch.isfinite(lse)
    loss = (out.double() * g_out).sum() + (torch.where(finite, lse.double(), 0.0) * g_lse).sum()
    return torch.autograd.grad(loss, inputs)


def assert_same(out, lse, grads, ref, ref_lse, ref_grads, atol=1e-10):
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    torch.testing.assert_close(lse[torch.isfinite(lse)].double(), ref_lse[torch.isfinite(ref_lse)], atol=atol, rtol=0)
    for g, rg in zip(grads, ref_grads):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g.double(), rg, atol=atol * 10, rtol=0)


@pytest.mark.parametrize("ws, rs", PATTERNS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("h, h_kv", [(4, 4), (4, 2)])
def test_packed_documents_match_each_document_alone(ws, rs, is_causal, h, h_kv):
    rng = random.Random()
    lengths = random_lengths(rng, rng.randint(2, 5), 40)
    q, k, v, cu = packed_inputs(lengths, h, h_kv, 8)
    out, lse = dilated_attention(q, k, v, ws, rs, is_causal=is_causal, cu_seqlens=cu, return_lse=True,
                                 backend="portable")
    assert out.shape == q.shape and lse.shape == (h, q.shape[0])
    ref, ref_lse = per_document_reference(q, k, v, lengths, ws, rs, is_causal=is_causal)
    g_out, g_lse = torch.randn_like(ref), torch.randn_like(ref_lse)
    grads = loss_and_grads(out, lse, (q, k, v), g_out, g_lse)
    ref_grads = loss_and_grads(ref, ref_lse, (q, k, v), g_out, g_lse)
    assert_same(out, lse, grads, ref, ref_lse, ref_grads)


def test_packed_documents_with_key_padding_mask_and_long_documents():
    """Documents longer than every segment (several chunks each) and a padding mask across documents."""
    rng = random.Random()
    lengths = random_lengths(rng, 3, 90) + [rng.randint(60, 90)]
    rng.shuffle(lengths)
    ws, rs = (6, 12, 24), (1, 2, 3)
    q, k, v, cu = packed_inputs(lengths, 6, 3, 8)
    mask = torch.rand(q.shape[0]) < 0.3
    for is_causal in (False, True):
        out, lse = dilated_attention(q, k, v, ws, rs, is_causal=is_causal, cu_seqlens=cu.long(),
                                     max_seqlen=max(lengths), key_padding_mask=mask, return_lse=True,
                                     backend="portable")
        ref, ref_lse = per_document_reference(q, k, v, lengths, ws, rs, mask, is_causal=is_causal)
        g_out, g_lse = torch.randn_like(ref), torch.randn_like(ref_lse)
        grads = loss_and_grads(out, lse, (q, k, v), g_out, g_lse)
        ref_grads = loss_and_grads(ref, ref_lse, (q, k, v), g_out, g_lse)
        assert_same(out, lse, grads, ref, ref_lse, ref_grads)


def test_packed_reference_backend_matches_portable():
    rng = random.Random()
    lengths = random_lengths(rng, 3, 30)
    q, k, v, cu = packed_inputs(lengths, 4, 4, 8)
    out = dilated_attention(q, k, v, (4, 8), (1, 2), cu_seqlens=cu, backend="portable")
    ref = dilated_attention(q, k, v, (4, 8), (1, 2), cu_seqlens=cu, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("is_causal", [False, True])
def test_sequence_starts_equal_each_row_unpadded(is_causal):
    """A left-padded row equals its sequence unpadded; the padding rows are zeros, LSE -inf, no gradient."""
    b, n, h, d = 3, 50, 4, 8
    ws, rs = (4, 8, 16), (1, 2, 4)
    starts = [random.randint(1, n - 1) for _ in range(b - 1)] + [0]
    q, k, v = (torch.randn(b, n, hh, d, dtype=torch.float64, requires_grad=True) for hh in (h, 2, 2))
    with torch.no_grad():  # padding may hold anything: it must reach nothing
        k[0, :starts[0]] = float("nan")
    out, lse = dilated_attention(q, k, v, ws, rs, is_causal=is_causal, sequence_starts=torch.tensor(starts),
                                 return_lse=True, backend="portable")
    g_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad((out * g_out).sum(), (q, k, v))
    for i, s in enumerate(starts):
        part = [x[i:i + 1, s:].detach().requires_grad_() for x in (q, k, v)]
        ref, ref_lse = reference_dilated_attention(*part, ws, rs, is_causal=is_causal)
        ref_grads = torch.autograd.grad((ref * g_out[i:i + 1, s:]).sum(), part)
        torch.testing.assert_close(out[i:i + 1, s:], ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(lse[i:i + 1, :, s:], ref_lse, atol=1e-10, rtol=0)
        assert torch.equal(out[i, :s], torch.zeros_like(out[i, :s]))
        assert bool((lse[i, :, :s] == float("-inf")).all())
        for g, rg in zip((dq, dk, dv), ref_grads):
            torch.testing.assert_close(g[i:i + 1, s:], rg, atol=1e-9, rtol=0)
            assert bool((g[i, :s] == 0).all())


def test_sequence_starts_with_a_fully_padded_row_and_padding_mask():
    b, n, h, d = 2, 20, 2, 8
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(b, n) < 0.3
    out = dilated_attention(q, k, v, (4, 8), (1, 2), sequence_starts=[n, 5], key_padding_mask=mask,
                            backend="portable")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    ref, _ = reference_dilated_attention(q[1:, 5:], k[1:, 5:], v[1:, 5:], (4, 8), (1, 2), key_padding_mask=mask[1:, 5:])
    torch.testing.assert_close(out[1:, 5:], ref, atol=1e-10, rtol=0)


def bad_cu(total):
    return [
        (torch.tensor([0, 5, 3, total], dtype=torch.int32), ValueError, "strictly increasing"),
        (torch.tensor([0, 4, 4, total], dtype=torch.int32), ValueError, "strictly increasing"),
        (torch.tensor([1, 4, total], dtype=torch.int32), ValueError, "start at 0"),
        (torch.tensor([0, 4, total - 1], dtype=torch.int32), ValueError, "end at the number of packed tokens"),
        (torch.tensor([0.0, 4.0, total]), TypeError, "dtype torch.int32 or torch.int64"),
        (torch.tensor([[0, total]]), ValueError, "shape"),
        ([0, 4, total], TypeError, "cu_seqlens must be an int32/int64 tensor"),
        (torch.tensor([0, total], device="meta"), ValueError, "device"),
    ]


@pytest.mark.parametrize("case", range(len(bad_cu(10))))
def test_bad_cu_seqlens_rejected(case):
    q, k, v, _ = packed_inputs([4, 6], 2, 2, 8)
    cu, err, match = bad_cu(10)[case]
    with pytest.raises(err, match=match):
        dilated_attention(q, k, v, (4,), (1,), cu_seqlens=cu)


def test_bad_varlen_arguments_rejected():
    q, k, v, cu = packed_inputs([4, 6], 2, 2, 8)
    with pytest.raises(ValueError, match="max_seqlen must be at least the longest document"):
        dilated_attention(q, k, v, (4,), (1,), cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match=r"query must have shape \(total, heads, head_dim\)"):
        dilated_attention(q[None], k[None], v[None], (4,), (1,), cu_seqlens=cu)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        dilated_attention(q, k, v, (4,), (1,), cu_seqlens=cu, key_padding_mask=torch.zeros(1, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="not both"):
        dilated_attention(q, k, v, (4,), (1,), cu_seqlens=cu, sequence_starts=[0])
    with pytest.raises(ValueError, match="max_seqlen is for packed documents"):
        dilated_attention(q[None], k[None], v[None], (4,), (1,), max_seqlen=4)
    q4, k4, v4 = (x[None].expand(2, -1, -1, -1) for x in (q, k, v))
    with pytest.raises(ValueError, match=r"sequence_starts\[1\] must be in \[0, seq=10\]"):
        dilated_attention(q4, k4, v4, (4,), (1,), sequence_starts=[0, 11])
    with pytest.raises(ValueError, match="one entry per batch row"):
        dilated_attention(q4, k4, v4, (4,), (1,), sequence_starts=[0])
    with pytest.raises(TypeError, match="integer tensor"):
        dilated_attention(q4, k4, v4, (4,), (1,), sequence_starts=torch.tensor([0.0, 1.0]))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (the fused path's gather-merge)")
@pytest.mark.parametrize("is_causal", [False, True])
def test_fused_merge_over_documents_matches_reference(is_causal):
    """The fused path's per-group Triton gather-merge (its interpreter on the CPU) writes each document's
    rows in place in the packed row, and a late-starting row's rows only."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.empty(1, 1, 1, 16, device=device, dtype=torch.float16)
    kernel = CpuFlashKernel() if device == "cpu" else choose_backend("fused", probe, None, 0.0, False).kernel
    dtype = torch.float32 if device == "cpu" else torch.float16
    rng = random.Random()
    lengths = random_lengths(rng, 3, 24)
    ws, rs = (4, 8), (1, 2)
    opts = EngineOptions(tuple(min(w, sum(lengths)) for w in ws), rs, "paper", False, is_causal, 0.25, 0.0, kernel,
                         chunk_tokens=8, merge="triton", grads_in_input_dtype=True)
    q, k, v, cu = packed_inputs(lengths, 2, 2, 16)
    starts = [0] + cu[1:-1].tolist()
    documents = (tuple(zip(starts, cu[1:].tolist())), ((3, sum(lengths)),))  # row 1: starts at 3
    q2, k2, v2 = (torch.stack([x.detach(), x.detach().flip(0)]).to(device, dtype) for x in (q, k, v))
    out, lse = run_engine(q2, k2, v2, None, opts, documents)
    ref, ref_lse = per_document_reference(q, k, v, lengths, ws, rs, is_causal=is_causal, scale=0.25)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[0].double().cpu(), ref, atol=tol, rtol=0)
    torch.testing.assert_close(lse[0].double().cpu().T, ref_lse, atol=tol, rtol=0)
    flipped = [x.detach().flip(0)[3:][None] for x in (q, k, v)]
    ref1, _ = reference_dilated_attention(*flipped, ws, rs, is_causal=is_causal, scale=0.25)
    torch.testing.assert_close(out[1, 3:].double().cpu(), ref1[0], atol=tol, rtol=0)
    assert bool((out[1, :3] == 0).all()) and bool((lse[1, :3] == float("-inf")).all())
