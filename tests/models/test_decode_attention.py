"""The gather decode path: the last rows of causal dilated attention over a full key/value history, computed
from only the keys each row's patterns select, equal those rows of the full causal pass (fp32/fp64), across
segment boundaries of every pattern, past the largest segment, batch > 1, GQA."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch.models.decoding import decode_attention
from dilated_attention_pytorch.reference import reference_dilated_attention

from tests.models.test_decoding import CASES

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_every_row_equals_the_full_causal_pass(case, dtype):
    ws, rs, offsets, h, h_kv, head_groups = case
    b, d = 3, 8
    n = 2 * max(ws) + 5  # every pattern's segment boundaries, past the largest segment
    q, k, v = (torch.randn(b, n, heads, d, dtype=torch.float64) for heads in (h, h_kv, h_kv))
    ref, _ = reference_dilated_attention(q, k, v, ws, rs, is_causal=True, offsets=offsets, head_groups=head_groups)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    for t in range(n):  # one query row at a time, as a decoding step sees it
        out = decode_attention(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], ws, rs, offsets=offsets,
                               head_groups=head_groups)
        assert out.dtype == dtype
        torch.testing.assert_close(out[:, 0].double(), ref[:, t], rtol=TOL[dtype], atol=TOL[dtype],
                                   msg=lambda m: f"row {t}: {m}")
    tail = decode_attention(q[:, -6:], k, v, ws, rs, offsets=offsets, head_groups=head_groups)  # several rows
    torch.testing.assert_close(tail.double(), ref[:, -6:], rtol=TOL[dtype], atol=TOL[dtype])


def test_huge_segments_cost_only_the_text():
    q, k, v = (torch.randn(2, 9, 4, 8, dtype=torch.float64) for _ in range(3))
    ws, rs = (4, 2**62), (1, 2**40)
    ref, _ = reference_dilated_attention(q, k, v, ws, rs, is_causal=True)
    torch.testing.assert_close(decode_attention(q[:, -3:], k, v, ws, rs), ref[:, -3:], rtol=1e-12, atol=1e-12)


def test_bad_shapes_raise():
    q, k = torch.randn(1, 5, 4, 8), torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="m <= n"):
        decode_attention(q, k, k, (4,), (1,))


@pytest.mark.parametrize("ws,rs,h,h_kv,offsets,head_groups", [
    ([4, 8, 16], [1, 4, 4], 2, 1, "torchscale", False),
    ([8, 16], [1, 4], 6, 2, "torchscale", True),
    ([8, 16], [1, 4], 4, 2, "paper", False),
    ([6, 12], [2, 3], 4, 4, "paper", False),
])
def test_a_nan_key_reaches_only_the_heads_that_see_it(ws, rs, h, h_kv, offsets, head_groups):
    """A NaN key inside another head's slot (same key/value head, another phase) leaves this head's row
    finite: decoding gives NaN exactly where the full causal pass does, and equal values elsewhere."""
    n = 26
    for u in range(n):  # the NaN at every position of every key/value head in turn
        for kh in range(h_kv):
            q = torch.randn(1, n, h, 4, dtype=torch.float64)
            k, v = torch.randn(1, n, h_kv, 4, dtype=torch.float64), torch.randn(1, n, h_kv, 4, dtype=torch.float64)
            k[0, u, kh] = float("nan")
            full, _ = reference_dilated_attention(q, k, v, ws, rs, is_causal=True, offsets=offsets,
                                                  head_groups=head_groups)
            dec = decode_attention(q[:, -1:], k, v, ws, rs, offsets=offsets, head_groups=head_groups)[:, 0]
            assert torch.equal(dec.isnan(), full[:, -1].isnan()), (u, kh)
            finite = ~full[:, -1].isnan()
            torch.testing.assert_close(dec[finite], full[:, -1][finite], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ws,rs,h,h_kv,offsets", [
    ([4, 8, 16], [1, 4, 4], 2, 1, "torchscale"),
    ([8, 16], [1, 4], 4, 2, "paper"),
    ([6, 12], [2, 3], 4, 4, "paper"),
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_reaches_only_the_heads_that_attend_it(ws, rs, h, h_kv, offsets, bad):
    """A NaN or inf value: the heads whose output depends on that value (found by changing it to two finite
    values) give NaN; every other head gives exactly what it gives with a finite value there."""
    n = 26
    q = torch.randn(1, n, h, 4, dtype=torch.float64)
    k, v = torch.randn(1, n, h_kv, 4, dtype=torch.float64), torch.randn(1, n, h_kv, 4, dtype=torch.float64)
    for u in range(n):
        for kh in range(h_kv):
            outs = []
            for value in (1.5, -3.0, bad):
                v2 = v.clone()
                v2[0, u, kh] = value
                outs.append(decode_attention(q[:, -1:], k, v2, ws, rs, offsets=offsets)[0, 0])  # (h, d)
            attends = (outs[0] != outs[1]).any(-1)  # (h,)
            assert outs[2][attends].isnan().all(), (u, kh)
            torch.testing.assert_close(outs[2][~attends], outs[0][~attends], rtol=0, atol=0)
