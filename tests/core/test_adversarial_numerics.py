"""Adversarial numerics (issue 13, items 2, 3, 5, 9): padding that holds NaN/inf is never read, NaN in
real inputs propagates (NaN is not "no keys"), the multi-pattern merge is exact at any finite logit,
and the strided-view memo is a bounded, locked LRU.

Backends checked on the CPU: ``portable`` (the CPU flash kernel), the math kernel, ``reference``, the
fused path's Triton gather-merge (Triton's interpreter), and block-sparse ``portable`` and ``triton``
(interpreter, float16). The fused path's cuDNN kernels and FlexAttention need a GPU.
"""

from __future__ import annotations

import importlib.util
import threading

import pytest
import torch

from tests.helpers.tensors import rand_qkv, rel_err
from dilated_attention_pytorch import block_sparse_attention, dilated_attention
from dilated_attention_pytorch.block_sparse.reference import reference_block_sparse_attention
from dilated_attention_pytorch.engine import EngineOptions, run_engine
from dilated_attention_pytorch.views import ViewMemo
from dilated_attention_pytorch.kernels import CpuFlashKernel, MathKernel
from dilated_attention_pytorch.merge import finish_merge, lse_shift, merge_step
from dilated_attention_pytorch.reference import count_matrix, reference_dilated_attention

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton runs on the GPU where there is one, else in its interpreter on the CPU (conftest sets that).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ENGINES = ["portable", "math", "reference"] + (["triton-merge"] if HAS_TRITON else [])


def attend(engine, q, k, v, ws, rs, *, mask=None, is_causal=False):
    """-> (out (b, n, h, d), lse (b, h, n)) of one backend; ``mask`` True marks padding."""
    if engine in ("portable", "reference"):
        return dilated_attention(q, k, v, ws, rs, is_causal=is_causal, key_padding_mask=mask, return_lse=True,
                                 backend=engine)
    if engine == "triton-merge" and TRITON_DEVICE != q.device.type:  # autograd carries gradients back
        out, lse = attend(engine, q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), v.to(TRITON_DEVICE), ws, rs,
                          mask=None if mask is None else mask.to(TRITON_DEVICE), is_causal=is_causal)
        return out.to(q.device), lse.to(q.device)
    n = q.shape[1]
    kernel = MathKernel() if engine == "math" or q.is_cuda else CpuFlashKernel()
    merge = "triton" if engine == "triton-merge" else "torch"
    opts = EngineOptions(tuple(min(w, n) for w in ws), tuple(rs), "paper", False, is_causal, q.shape[-1] ** -0.5,
                         0.0, kernel, chunk_tokens=64 if merge == "triton" else 16, merge=merge,
                         grads_in_input_dtype=merge == "triton")  # one gather launch per call in the interpreter
    out, lse = run_engine(q, k, v, None if mask is None else ~mask, opts)
    return out, lse.transpose(1, 2)


def grads_of(out, lse, inputs, g_out, g_lse):
    finite = torch.isfinite(lse)
    loss = (out.double() * g_out).sum() + (torch.where(finite, lse.double(), 0.0) * g_lse).sum()
    return torch.autograd.grad(loss, inputs)


# ---- item 2: padded keys/values are never read, whatever they hold ----------------------------------


POISONS = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("engine,poison", [(e, p) for e in ENGINES for p in POISONS
                                           if e != "triton-merge" or p != p])  # the interpreter: NaN only
@pytest.mark.parametrize("is_causal", [False, True])
def test_padded_keys_and_values_are_never_read(engine, poison, is_causal):
    """NaN/inf in padded keys and values (and everywhere in a batch entry that is all padding) changes
    nothing: outputs, LSEs and gradients equal those with other (finite) padding, bit for bit, match
    the float64 reference, hold no NaN, and padded keys/values get exactly zero gradient."""
    dtype = torch.float32 if engine == "triton-merge" else torch.float64
    b, n, h, h_kv, d, ws, rs = 2, 37, 4, 2, 8, (8, 16, 37), (1, 2, 4)
    mask = torch.rand(b, n) < 0.3
    mask[0, :3] = True  # rows whose causal keys are all padded
    mask[1] = True  # a batch entry that is all padding
    q, k, v = rand_qkv(b, n, h, h_kv, d, dtype=dtype, requires_grad=False)
    g_out, g_lse = torch.randn(b, n, h, d, dtype=torch.float64), torch.randn(b, h, n, dtype=torch.float64)
    results = []
    for fill in (poison, None):  # poisoned padding, then other finite padding
        qq, kk, vv = q.clone(), k.clone(), v.clone()
        for t in (kk, vv):
            t[mask] = fill if fill is not None else torch.randn_like(t[mask])
        qq[1] = fill if fill is not None else 0.5  # the queries of rows that see no key at all
        qq, kk, vv = (t.requires_grad_() for t in (qq, kk, vv))
        out, lse = attend(engine, qq, kk, vv, ws, rs, mask=mask, is_causal=is_causal)
        grads = grads_of(out, lse, (qq, kk, vv), g_out, g_lse)
        results.append((out, lse, grads))
        assert not out.isnan().any() and not lse.isnan().any()
        assert all(not g.isnan().any() for g in grads)
        assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf")) and torch.all(grads[0][1] == 0)
        assert torch.all(grads[1][mask] == 0) and torch.all(grads[2][mask] == 0)  # exactly zero
    (out, lse, grads), (out_c, lse_c, grads_c) = results
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    assert torch.equal(grads[0][0], grads_c[0][0])
    for g, gc in zip(grads[1:], grads_c[1:]):
        assert torch.equal(g, gc)
    clean_k, clean_v = (torch.where(mask[..., None, None], 0.0, t) for t in (k, v))
    ref, ref_lse = reference_dilated_attention(q, clean_k, clean_v, ws, rs, is_causal=is_causal,
                                               key_padding_mask=mask)
    atol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double()[0], ref[0], atol=atol, rtol=0)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))


BS_BACKENDS = ["portable"] + (["triton"] if HAS_TRITON else [])


def _block_sparse(backend, q, k, v, layout, block_size, is_causal):
    if backend == "triton":  # pointer loads: the path that must mask rows past the end itself
        from dilated_attention_pytorch.block_sparse.triton_path import triton_block_sparse_attention

        out, lse = triton_block_sparse_attention(q, k, v, layout,
                                                 block_size=block_size, is_causal=is_causal, scale=q.shape[-1] ** -0.5,
                                                 loads="pointers")
        return out, lse
    return block_sparse_attention(q, k, v, layout, block_size=block_size, is_causal=is_causal, return_lse=True,
                                  backend=backend)


@pytest.mark.parametrize("backend", BS_BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_block_sparse_keys_outside_the_layout_or_past_the_end_are_never_read(backend, is_causal):
    """NaN in the keys/values of a key block reaches only the rows whose layout lists that block; NaN
    past the end of the sequence (inputs that are views of a larger buffer) reaches nothing."""
    triton = backend == "triton"
    dtype, bs = (torch.float16, 128) if triton else (torch.float64, 4)
    dev = TRITON_DEVICE if triton else "cpu"
    n, h, d = 3 * bs - bs // 2, 2, 16  # a partial last block
    layout = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool, device=dev)[None].expand(h, -1, -1).clone()
    layout[1, 2, 0] = True  # head 1's last query block also sees block 0
    bufs = [torch.randn(1, n + bs, h, d, dtype=torch.float64).to(dev, dtype) for _ in range(3)]
    for buf in bufs:
        buf[:, n:] = float("nan")  # past the end
    q, k, v = (buf[:, :n] for buf in bufs)  # views: their storage goes on past n
    sees_0 = layout[:, :, 0].repeat_interleave(bs, 1)[:, :n]  # (h, n): the rows that see key block 0
    out_c, lse_c = _block_sparse(backend, q, k, v, layout, bs, is_causal)
    assert not out_c.isnan().any() and not lse_c.isnan().any()
    ref, ref_lse = reference_block_sparse_attention(q, k, v, layout, block_size=bs, is_causal=is_causal)
    torch.testing.assert_close(out_c.double(), ref, atol=2e-3 if triton else 1e-10, rtol=0)
    kk, vv = k.clone(), v.clone()
    kk[:, :bs] = float("nan")  # key block 0
    vv[:, :bs] = float("nan")
    qq = q.clone().requires_grad_()
    out, lse = _block_sparse(backend, qq, kk, vv, layout, bs, is_causal)
    unseen = ~sees_0.T[None]  # (1, n, h)
    assert torch.equal(out[unseen], out_c[unseen])
    assert torch.equal(lse.transpose(1, 2)[unseen], lse_c.transpose(1, 2)[unseen])
    assert out[~unseen].isnan().all(-1).all()
    g = torch.randn_like(out) * unseen[..., None]  # a loss of the rows that do not see block 0
    (dq,) = torch.autograd.grad(out, qq, g)
    assert not dq[unseen].isnan().any()


# ---- item 3: NaN in real inputs propagates; NaN is not "no keys" ------------------------------------


NAN_QUERY_CASES = [((16, 32), (4, 8), False), ((8, 16), (1, 2), True), ((4, 16), (4, 2), True)]


@pytest.mark.parametrize("engine,ws,rs,is_causal", [(e, *c) for e in ENGINES for c in NAN_QUERY_CASES
                                                    if e != "triton-merge" or c is NAN_QUERY_CASES[0]])
def test_nan_query_row_propagates(engine, ws, rs, is_causal):
    """A NaN query row gives NaN output and LSE on every head that covers it, as in SDPA and the
    reference (the CPU kernel's short blocks returned zeros and LSE 0), and a NaN gradient for itself
    (a NaN LSE is not "no keys"); other rows are untouched."""
    dtype = torch.float32  # the CPU kernel's NaN-dropping tail is 8 keys wide in float32
    q, k, v = rand_qkv(1, 64, 8, 8, 8, dtype=dtype, requires_grad=False)
    t = 21
    q[0, t] = float("nan")
    q.requires_grad_()
    out, lse = attend(engine, q, k, v, ws, rs, is_causal=is_causal)
    ref, ref_lse = reference_dilated_attention(q.detach().nan_to_num(0.0), k, v, ws, rs, is_causal=is_causal)
    covered = torch.isfinite(ref_lse[0, :, t])  # heads whose patterns cover row t
    assert covered.any()
    assert out[0, t, covered].isnan().all() and lse[0, covered, t].isnan().all()
    assert torch.all(out[0, t, ~covered] == 0) and torch.all(lse[0, ~covered, t] == float("-inf"))
    others = torch.ones(64, dtype=torch.bool)
    others[t] = False
    assert not out[0, others].isnan().any()
    torch.testing.assert_close(out[0, others].double(), ref[0, others], atol=2e-5, rtol=0)
    (dq,) = torch.autograd.grad(out, q, torch.randn_like(out))
    assert dq[0, t, covered].isnan().all()


@pytest.mark.parametrize("engine", ENGINES)
def test_nan_key_seen_alone_propagates(engine):
    """Under causal attention query 0 sees key 0 only: a NaN key 0 makes its row NaN on the heads that
    cover it (all its scores are NaN, which the CPU kernel took for "no keys")."""
    q, k, v = rand_qkv(1, 24, 2, 2, 8, dtype=torch.float32, requires_grad=False)
    k[0, 0] = float("nan")
    out, lse = attend(engine, q, k, v, (4, 8), (1, 2), is_causal=True)  # blocks of 4 keys: the kernel's tail
    assert out[0, 0, 0].isnan().all() and lse[0, 0, 0].isnan()  # head 1's offset does not cover row 0
    assert not out[0, 8:].isnan().any()  # other segments of every pattern


@pytest.mark.parametrize("backend", BS_BACKENDS)
def test_block_sparse_nan_query_propagates(backend):
    """Block-sparse: a NaN query row gives NaN output and LSE and a NaN query gradient, with and without
    the LSE (the portable path runs the CPU kernel without it, the math kernel with it); rows that see
    no key take no gradient even from a NaN incoming LSE gradient."""
    triton = backend == "triton"
    dtype, bs = (torch.float16, 128) if triton else (torch.float32, 4)
    dev = TRITON_DEVICE if triton else "cpu"
    n, h = 2 * bs, 2
    layout = torch.tensor([[1, 0], [0, 0]], dtype=torch.bool, device=dev)[None].expand(h, -1, -1)  # block 1: nothing
    q, k, v = rand_qkv(1, n, h, h, 16, dtype=dtype, device=dev, requires_grad=False)
    q[0, 1] = float("nan")
    q.requires_grad_()
    out_only = block_sparse_attention(q, k, v, layout, block_size=bs, backend=backend)
    out, lse = _block_sparse(backend, q, k, v, layout, bs, False)
    for o in (out_only, out):
        assert o[0, 1].isnan().all() and not o[0, 2:].isnan().any()
    assert lse[0, :, 1].isnan().all() and torch.all(lse[0, :, bs:] == float("-inf"))
    (dq,) = torch.autograd.grad(out_only, q, torch.randn_like(out_only))
    assert dq[0, 1].isnan().all() and not dq[0, 2:].isnan().any()
    g_lse = torch.zeros_like(lse)
    g_lse[:, :, bs:] = float("nan")
    (dq,) = torch.autograd.grad((out, lse), q, (torch.randn_like(out), g_lse))
    assert dq[0, 1].isnan().all() and not dq[0, 2:].isnan().any()


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_nan_rows_found_without_a_host_sync_as_with_one(is_causal, with_mask):
    """Under torch.compile the CPU kernel's all-NaN rows are found from the inputs (no host sync in a
    graph): the same rows, and the same result, as the eager path that recomputes them."""
    from dilated_attention_pytorch.kernels.aten import _nan_rows_from_inputs

    kernel = CpuFlashKernel()
    q, k, v = (torch.randn(3, 2, 6, 8) for _ in range(3))
    q[0, 1, 2] = float("nan")  # a NaN query
    k[1, :, 0] = float("nan")  # causal row 0 sees only this key
    k[2, 0] = float("nan")  # every key of a head
    valid = torch.rand(3, 6) > 0.3 if with_mask else None
    if with_mask:
        valid[1, :2] = True
        valid[0, :] = False if not is_causal else valid[0, :]
    out, lse, _ = kernel.forward(q, k, v, key_valid=valid, is_causal=is_causal, scale=0.3, dropout_p=0.0)
    ref, ref_lse = reference_block(q, k, v, valid, is_causal, 0.3)
    assert torch.equal(lse.isnan(), ref_lse.isnan()) and torch.equal(out.isnan(), ref.isnan())
    qi, ki, vi = (t.clone() for t in (q, k, v))
    raw_out, raw_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *inert(qi, ki, vi, valid, is_causal), 0.0, is_causal, attn_mask=additive(valid), scale=0.3)[:2]
    traced_out, traced_lse = _nan_rows_from_inputs(raw_out, raw_lse, *inert(qi, ki, vi, valid, is_causal)[:2],
                                                   valid, is_causal)
    assert torch.equal(traced_lse.isnan(), lse.isnan()) and torch.equal(traced_out.isnan(), out.isnan())


def inert(q, k, v, valid, is_causal):
    from dilated_attention_pytorch.kernels.base import has_key

    if valid is None:
        return q, k, v
    q = torch.where(has_key(valid, is_causal)[:, None, :, None], q, 0.0)
    return q, torch.where(valid[:, None, :, None], k, 0.0), torch.where(valid[:, None, :, None], v, 0.0)


def additive(valid):
    return None if valid is None else torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))[:, None, None, :]


def reference_block(q, k, v, valid, is_causal, scale):
    """Dense float64 attention of a (B, H, L, D) block: NaN exactly where a row reads a NaN."""
    qd, kd, vd = inert(q.double(), k.double(), v.double(), valid, is_causal)
    allowed = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool)
    allowed = allowed.tril() if is_causal else allowed
    allowed = allowed[None, None] & (True if valid is None else valid[:, None, None, :])
    s = torch.where(allowed, qd @ kd.transpose(-1, -2) * scale, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
    return p @ vd, lse


def test_merge_tells_nan_from_no_keys():
    out_a, out_b = torch.randn(3, 4), torch.randn(3, 4)
    lse_a = torch.tensor([float("nan"), float("-inf"), float("-inf")])
    lse_b = torch.tensor([0.5, float("-inf"), 2.0])
    state = torch.zeros(3, 4), torch.full((3,), float("-inf")), torch.zeros(3)
    for out_i, lse_i in ((out_a, lse_a), (out_b, lse_b)):
        state = merge_step(*state, out_i, lse_i)
    out, lse = finish_merge(state[0], lse_shift(state[1]), state[2])
    assert out[0].isnan().all() and lse[0].isnan()
    assert torch.all(out[1] == 0) and lse[1] == float("-inf")
    assert torch.equal(out[2], out_b[2]) and lse[2] == 2.0


# ---- item 5: the multi-pattern merge is exact to the dtype at any finite logit -----------------------


def plain_same_dtype(q, k, v, ws, rs):
    """softmax(scale·QKᵀ + log C) V computed densely in the inputs' dtype: the error budget."""
    b, n, h, d = q.shape
    qd, kd, vd = (x.transpose(1, 2) for x in (q, k, v))
    c = count_matrix(n, h, ws, rs).to(q.dtype)
    s = (qd @ kd.transpose(-1, -2)) * d**-0.5 + torch.where(c > 0, c, 1.0).log()
    s = s.masked_fill(c == 0, float("-inf"))
    return (torch.softmax(s, -1) @ vd).transpose(1, 2), torch.logsumexp(s, -1)


def _logit_inputs(n, h, d, logit, dtype, same_keys):
    """Scores ``logit + O(1)`` (random keys) or exactly ``logit`` for every key (identical keys)."""
    q, k, v = (torch.randn(1, n, h, d, dtype=torch.float64) for _ in range(3))
    if same_keys:
        k[:] = k[:, :1]
        q = k * (logit / (d**-0.5 * (k * k).sum(-1, keepdim=True)))
    else:
        k[..., 0] = 1.0
        q[..., 0] = logit / d**-0.5
    return tuple(x.to(dtype).requires_grad_() for x in (q, k, v))


def check_within_twice_plain(out, lse, q, k, v, ref, ref_lse, plain, plain_lse, scale, grads=True):
    """Errors against float64 within 2x plain PyTorch's in the same dtype, plus a few units of roundoff
    (plain is exact where every score of a row is equal, e.g. one key); gradients' roundoff relative to
    the magnitude of the terms they sum."""
    eps = torch.finfo(q.dtype).eps
    assert rel_err(out, ref) <= 2 * rel_err(plain, ref) + 4 * eps, (rel_err(out, ref), rel_err(plain, ref))
    assert rel_err(lse, ref_lse) <= 2 * rel_err(plain_lse, ref_lse) + 4 * eps
    if not grads:
        return
    g = torch.randn_like(ref)
    ours = torch.autograd.grad((out.double() * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v))
    base = torch.autograd.grad((plain.double() * g).sum(), (q, k, v))
    amax = lambda x: x.detach().double().abs().max().item()  # noqa: E731
    terms = [scale * amax(g) * amax(v) * amax(k), scale * amax(g) * amax(v) * amax(q), amax(g)]  # dq, dk, dv
    for name, a, w, p, term in zip("qkv", ours, want, base, terms):
        err, budget = (a.double() - w).norm().item(), (p.double() - w).norm().item()
        assert err <= 2 * budget + 8 * eps * term * w.numel() ** 0.5, (name, err, budget, term)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("logit", [50.0, 1e3, 7e3, 4.5e4, 3.9e6, 1e7])
def test_merge_exact_at_large_logits_one_token(dtype, logit):
    """n = 1, three patterns: every pattern's LSE is the one score s, the merged LSE s + log 3. The
    weights were exp(lse_i - lse) with lse rounded at ulp(s) (2e-5 at 7e3 in float32; the output was 3v
    at 5.6e7); relative to the largest LSE they are exactly 1."""
    ws, rs = (2, 4, 8), (1, 1, 1)
    q, k, v = _logit_inputs(1, 2, 8, logit, dtype, same_keys=True)
    out, lse = dilated_attention(q, k, v, ws, rs, return_lse=True)
    ref, ref_lse = reference_dilated_attention(q, k, v, ws, rs)
    plain, plain_lse = plain_same_dtype(q, k, v, ws, rs)
    check_within_twice_plain(out, lse, q, k, v, ref, ref_lse, plain, plain_lse, 8**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("logit,same_keys", [(50.0, False), (1e3, False), (1e4, False), (1e3, True), (1e5, True)])
def test_merge_exact_at_large_logits(dtype, logit, same_keys):
    """Many tokens, three patterns of different dilations (rows covered once, twice, three times), all
    scores offset by ``logit``: random keys, or identical keys (every score of a row equal, where plain
    PyTorch is exact). With identical keys only the output and LSE are compared: every flash-style
    backward (SDPA's CPU kernel, each block here) recomputes ``P = exp(S - lse)`` from a rounded LSE
    (``ulp(lse)`` at ``|lse| = 1e5`` is 8e-3 in float32), where plain softmax subtracts an exact score."""
    ws, rs = (8, 16, 40), (1, 2, 4)
    q, k, v = _logit_inputs(40, 4, 8, logit, dtype, same_keys)
    out, lse = dilated_attention(q, k, v, ws, rs, return_lse=True)
    ref, ref_lse = reference_dilated_attention(q, k, v, ws, rs)
    plain, plain_lse = plain_same_dtype(q, k, v, ws, rs)
    check_within_twice_plain(out, lse, q, k, v, ref, ref_lse, plain, plain_lse, 8**-0.5, grads=not same_keys)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("logit", [1e3, 7e3, 1e5, 1e7])
def test_block_sparse_merge_exact_at_large_logits(dtype, logit):
    """Block-sparse portable, blocks of one token: a row's keys in six tiles, every score equal to
    ``logit`` (each tile's LSE exactly the score). The tiles' merge keeps the largest LSE and a sum of
    weights, never a merged LSE rounded at each step, forward and backward."""
    n = 6
    q, k, v = _logit_inputs(n, 2, 8, logit, dtype, same_keys=True)
    layout = torch.ones(1, n, n, dtype=torch.bool)
    out, lse = block_sparse_attention(q, k, v, layout, block_size=1, return_lse=True, backend="portable")
    ref, ref_lse = reference_block_sparse_attention(q, k, v, layout, block_size=1)
    plain, plain_lse = plain_same_dtype(q, k, v, (n,), (1,))
    check_within_twice_plain(out, lse, q, k, v, ref, ref_lse, plain, plain_lse, 8**-0.5)


def test_triton_gather_merge_exact_at_large_logits():
    """The fused path's gather kernel (Triton's interpreter on the CPU) weights relative to the largest
    LSE too, and with its merge statistics the float32 backward is exact."""
    pytest.importorskip("triton")
    ws, rs = (2, 4, 8), (1, 1, 1)
    q, k, v = _logit_inputs(1, 2, 16, 7e3, torch.float32, same_keys=True)
    out, lse = attend("triton-merge", q, k, v, ws, rs)
    ref, ref_lse = reference_dilated_attention(q, k, v, ws, rs)
    plain, plain_lse = plain_same_dtype(q, k, v, ws, rs)
    check_within_twice_plain(out, lse, q, k, v, ref, ref_lse, plain, plain_lse, 16**-0.5)


# ---- item 9: the strided-view memo is a bounded, thread-safe LRU -------------------------------------


def test_view_memo_evicts_least_recently_used():
    memo = ViewMemo(maxsize=3)
    builds = []
    x = torch.randn(4, 6)

    def call(i):
        return memo(x, ("col", i), lambda t: (builds.append(i), t[:, i])[1])

    for i in range(3):
        call(i)
    call(0)  # remembered: no build; now the most recent
    call(3)  # full: evicts the least recently used (1), not everything
    builds.clear()
    for i in (0, 2, 3):
        assert torch.equal(call(i), x[:, i])
    assert builds == []
    call(1)
    assert builds == [1]


def test_view_memo_is_thread_safe():
    """Eight threads, more layouts than the memo holds: every view is right, the memo stays bounded."""
    memo = ViewMemo(maxsize=8)
    barrier = threading.Barrier(8)
    errors = []

    def worker(seed):
        gen = torch.Generator().manual_seed(seed)
        barrier.wait()
        try:
            for _ in range(300):
                rows = int(torch.randint(2, 6, (1,), generator=gen))
                start = int(torch.randint(0, 3, (1,), generator=gen))
                x = torch.randn(rows + 3, 5)[start:]
                got = memo(x, ("narrow", rows), lambda t, r=rows: t.narrow(0, 0, r).t())
                if not (torch.equal(got, x[:rows].t()) and got.stride() == x[:rows].t().stride()):
                    errors.append("wrong view")
        except Exception as e:  # a failure in a thread must reach the test
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(memo._specs) <= 8
