"""Awkward shapes and the low-precision check against the float64 reference (shared by tests/api and tests/cuda)."""

from __future__ import annotations

import torch

from dilated_attention_pytorch import dilated_attention
from dilated_attention_pytorch.reference import count_matrix, reference_dilated_attention
from tests.helpers.tensors import rel_err

AWKWARD = [
    # (n, h, h_kv, ws, rs, offsets, head_groups)            what it exercises
    (50, 4, 4, [16], [1], "paper", False),                   # n % w != 0
    (48, 4, 2, [16, 12], [3, 5], "paper", False),            # w % r != 0, GQA
    (32, 5, 5, [8, 16], [2, 4], "paper", True),              # h % r != 0 with head groups
    (3, 4, 1, [8, 16], [4, 8], "paper", False),              # n < r, multi-query
    (1, 3, 3, [4, 8], [2, 3], "torchscale", False),          # n = 1
    (40, 4, 4, [8, 16], [2, 4], "group", False),             # all r > 1: rows nobody covers
    (64, 6, 3, [16, 32, 64], [1, 2, 4], "torchscale", True),
    (37, 4, 2, [16, 32], [2, 3], [[1, 0, 1, 0], [2, 1, 0, 2]], False),  # explicit offsets
    (30, 2, 2, [30, 10], [1, 1], "paper", False),            # the same key through two patterns counts twice
]

def plain_low_precision(q, k, v, ws, rs, is_causal):
    """The same formula computed plainly in the inputs' dtype: the error budget for low precision."""
    b, n, h, d = q.shape
    g = h // k.shape[2]
    qd, kd, vd = q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2)
    c = count_matrix(n, h, ws, rs, device=q.device)
    allowed = c > 0
    if is_causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    s = (qd @ kd.transpose(-1, -2)) * d**-0.5 + torch.where(c > 0, c, 1.0).log().to(q.dtype)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return (p @ vd).transpose(1, 2)


def check_low_precision(q, k, v, ws, rs, is_causal, backend):
    out = dilated_attention(q, k, v, ws, rs, is_causal=is_causal, backend=backend)
    ref, _ = reference_dilated_attention(q, k, v, ws, rs, is_causal=is_causal)
    plain = plain_low_precision(q, k, v, ws, rs, is_causal)
    err, budget = rel_err(out, ref), rel_err(plain, ref)
    assert err <= 2 * budget, (err, budget)
    g_out = torch.randn_like(ref)
    grads = torch.autograd.grad((out.double() * g_out).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g_out).sum(), (q, k, v))
    plain_grads = torch.autograd.grad((plain.double() * g_out).sum(), (q, k, v))
    for gr, rg, pg in zip(grads, ref_grads, plain_grads):
        # absolute norms: a reference gradient can be exactly zero (a row that sees only itself)
        ours, plain_err = (gr.double() - rg).norm().item(), (pg.double() - rg).norm().item()
        assert ours <= 2 * plain_err + 1e-3 * max(rg.norm().item(), 1.0), (ours, plain_err, rg.norm().item())
