"""dilated_attention against the dense float64 reference: forward, LSE, gradients, awkward shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.reference_checks import AWKWARD, check_low_precision
from tests.helpers.tensors import LOW_PRECISION, rand_qkv, rel_err
from dilated_attention_pytorch import dilated_attention
from dilated_attention_pytorch.reference import reference_dilated_attention


def run_both(q, k, v, ws, rs, **kw):
    """(out, lse, grads) of the portable path and of the reference, for one random cotangent."""
    out, lse = dilated_attention(q, k, v, ws, rs, return_lse=True, backend="portable", **kw)
    ref, ref_lse = reference_dilated_attention(q, k, v, ws, rs, **kw)
    g_out = torch.randn_like(ref)
    g_lse = torch.randn_like(ref_lse)
    finite = torch.isfinite(ref_lse)
    # the LSE enters the loss too, so the gradient through it is checked
    loss = (out.double() * g_out).sum() + (torch.where(finite, lse.double(), 0.0) * g_lse).sum()
    ref_loss = (ref * g_out).sum() + (torch.where(finite, ref_lse, 0.0) * g_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    return (out, lse, grads), (ref, ref_lse, ref_grads)


def assert_matches(ours, ref, atol=1e-10):
    out, lse, grads = ours
    r_out, r_lse, r_grads = ref
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), r_out, atol=atol, rtol=0)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(r_lse))
    torch.testing.assert_close(lse[torch.isfinite(lse)].double(), r_lse[torch.isfinite(r_lse)], atol=atol, rtol=0)
    for g, rg in zip(grads, r_grads):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g.double(), rg, atol=atol * 10, rtol=0)


@st.composite
def problems(draw):
    k = draw(st.integers(1, 3))
    ws = [draw(st.integers(1, 24)) for _ in range(k)]
    rs = [draw(st.integers(1, min(w, 6))) for w in ws]
    h_kv = draw(st.integers(1, 3))
    h = h_kv * draw(st.integers(1, 3))
    return dict(
        b=draw(st.integers(1, 2)), n=draw(st.integers(1, 40)), h=h, h_kv=h_kv, d=draw(st.sampled_from([1, 4, 8])),
        ws=ws, rs=rs, is_causal=draw(st.booleans()), offsets=draw(st.sampled_from(["paper", "torchscale", "group"])),
        head_groups=draw(st.booleans()) and h >= k,  # head_groups needs a head per pattern (issue 13)
        pad=draw(st.sampled_from([0.0, 0.3, 0.9])), scale=draw(st.sampled_from([None, 0.37])),
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_reference_random(p):
    q, k, v = rand_qkv(p["b"], p["n"], p["h"], p["h_kv"], p["d"])
    mask = torch.rand(p["b"], p["n"]) < p["pad"] if p["pad"] else None
    kw = dict(is_causal=p["is_causal"], offsets=p["offsets"], head_groups=p["head_groups"], key_padding_mask=mask,
              scale=p["scale"])
    assert_matches(*run_both(q, k, v, p["ws"], p["rs"], **kw))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", AWKWARD)
def test_matches_reference_awkward(case, is_causal, device):
    n, h, h_kv, ws, rs, offsets, hg = case
    q, k, v = rand_qkv(2, n, h, h_kv, 8, device=device)
    mask = torch.rand(2, n, device=device) < 0.25
    mask[1] = True if n < 4 else mask[1]  # fully padded batch entry for short sequences
    assert_matches(*run_both(q, k, v, ws, rs, is_causal=is_causal, offsets=offsets, head_groups=hg))
    assert_matches(*run_both(q, k, v, ws, rs, is_causal=is_causal, offsets=offsets, head_groups=hg,
                             key_padding_mask=mask))


def test_rows_without_keys_are_zero_with_no_gradient():
    """'group' offsets with r > 1 leave rows uncovered; a fully padded batch entry sees nothing."""
    q, k, v = rand_qkv(2, 20, 2, 2, 4)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1] = True
    out, lse = dilated_attention(q, k, v, [8], [2], offsets="group", key_padding_mask=mask, return_lse=True)
    uncovered = torch.tensor([(t % 8) % 2 != 0 for t in range(20)])
    assert torch.all(out[0, uncovered] == 0) and torch.all(out[1] == 0)
    assert torch.all(lse[0][:, uncovered] == float("-inf")) and torch.all(lse[1] == float("-inf"))
    assert torch.all(torch.isfinite(lse[0][:, ~uncovered]))
    out.sum().backward()
    assert torch.all(q.grad[0, uncovered] == 0) and torch.all(q.grad[1] == 0)
    assert torch.all(k.grad[1] == 0) and torch.all(v.grad[1] == 0)
    assert not any(torch.isnan(t.grad).any() for t in (q, k, v))


@pytest.mark.parametrize("offsets", ["paper", "torchscale"])
def test_causal_future_does_not_leak(offsets, device):
    q, k, v = rand_qkv(1, 45, 4, 2, 8, device=device, requires_grad=False)
    ws, rs = [8, 16, 32], [1, 2, 4]
    base = dilated_attention(q, k, v, ws, rs, is_causal=True, offsets=offsets)
    for t in (0, 7, 8, 21, 44):
        k2, v2, q2 = k.clone(), v.clone(), q.clone()
        for x in (q2, k2, v2):
            x[:, t] += torch.randn_like(x[:, t])
        out = dilated_attention(q2, k2, v2, ws, rs, is_causal=True, offsets=offsets)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.equal(out[:, t], base[:, t])


def test_gradcheck_float64():
    q, k, v = rand_qkv(1, 11, 4, 2, 3)
    mask = torch.tensor([[False] * 9 + [True] * 2])
    fn = lambda q, k, v: dilated_attention(  # noqa: E731
        q, k, v, [4, 8], [1, 3], is_causal=True, key_padding_mask=mask, return_lse=True
    )
    wrapped = lambda q, k, v: tuple(torch.nan_to_num(t, neginf=0.0) for t in fn(q, k, v))  # noqa: E731
    assert torch.autograd.gradcheck(wrapped, (q, k, v))


def test_dropout_backward_is_exact_for_its_mask():
    """With the random stream fixed, dropout is a deterministic function: gradcheck its backward."""
    q, k, v = rand_qkv(1, 13, 2, 1, 3)

    def fn(q, k, v):
        torch.manual_seed(1234)
        return dilated_attention(q, k, v, [4, 8], [1, 2], dropout_p=0.3, is_causal=True)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    with torch.no_grad():
        dropped, plain = fn(q, k, v), dilated_attention(q, k, v, [4, 8], [1, 2], is_causal=True)
    assert not torch.allclose(dropped, plain)


def test_dropout_mean_matches_no_dropout():
    q, k, v = rand_qkv(1, 16, 2, 2, 4, requires_grad=False)
    plain = dilated_attention(q, k, v, [8], [1])
    mean = torch.stack([dilated_attention(q, k, v, [8], [1], dropout_p=0.5) for _ in range(3000)]).mean(0)
    assert rel_err(mean, plain) < 0.05


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("is_causal", [False, True])
def test_low_precision_error_within_twice_plain_pytorch(dtype, is_causal, device):
    q, k, v = rand_qkv(2, 300, 8, 4, 64, device=device, dtype=dtype)
    check_low_precision(q, k, v, [64, 128, 256], [1, 2, 4], is_causal, "portable")


def test_non_contiguous_inputs():
    base = torch.randn(2, 30, 4, 8, 2, dtype=torch.float64)
    q, k, v = base[..., 0], base[:, :, :2, :, 1], base[:, :, 2:, :, 1]  # strided views
    out = dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True)
    ref, _ = reference_dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_reference_backend_matches_portable():
    q, k, v = rand_qkv(1, 33, 4, 2, 8, dtype=torch.float32, requires_grad=False)
    a = dilated_attention(q, k, v, [16, 32], [1, 2], backend="reference")
    b = dilated_attention(q, k, v, [16, 32], [1, 2], backend="portable")
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_no_global_side_effects():
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    q, k, v = rand_qkv(1, 16, 2, 2, 4, dtype=torch.float32)
    dilated_attention(q, k, v, [8], [2]).sum().backward()
    assert flags == (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     torch.get_float32_matmul_precision())
