"""The index math and the reference's count matrix against a literal reading of SPEC §1."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilated_attention_pytorch.patterns import head_groups_of, pattern_groups, row_spans
from dilated_attention_pytorch.reference import count_matrix


def spec_offsets(rule, i, r, heads):
    """Offsets written out from SPEC §1, independently of the library."""
    m = len(heads)
    out = []
    for jj, j in enumerate(heads):
        if rule == "paper":
            out.append(jj % r)
        elif rule == "torchscale":
            out.append(jj // math.ceil(m / r))
        elif rule == "group":
            out.append(i % r)
        else:
            out.append(rule[i][jj])
    return out


def spec_counts(n, h, ws, rs, rule, head_groups):
    """C[j][t][u] by a literal loop over the SPEC's definition."""
    k = len(ws)
    if head_groups:
        groups, start = [], 0
        for i in range(k):
            size = h // k + (1 if i < h % k else 0)
            groups.append(list(range(start, start + size)))
            start += size
    else:
        groups = [list(range(h))] * k
    counts = [[[0] * n for _ in range(n)] for _ in range(h)]
    for i, (w, r) in enumerate(zip(ws, rs)):
        W = min(w, n)
        for j, o in zip(groups[i], spec_offsets(rule, i, r, groups[i])):
            for t in range(n):
                for u in range(n):
                    if t // W == u // W and (t % W) % r == o == (u % W) % r:
                        counts[j][t][u] += 1
    return torch.tensor(counts, dtype=torch.float64)


@st.composite
def configs(draw):
    k = draw(st.integers(1, 3))
    ws = [draw(st.integers(1, 12)) for _ in range(k)]
    rs = [draw(st.integers(1, w)) for w in ws]
    n = draw(st.integers(1, 20))
    head_groups = draw(st.booleans())
    h = draw(st.integers(k if head_groups else 1, 6))  # head_groups needs a head per pattern (issue 13)
    rule = draw(st.sampled_from(["paper", "torchscale", "group"]))
    return n, h, ws, rs, rule, head_groups


@settings(max_examples=60, deadline=None)
@given(configs())
def test_count_matrix_matches_spec(cfg):
    n, h, ws, rs, rule, hg = cfg
    assert torch.equal(count_matrix(n, h, ws, rs, rule, hg), spec_counts(n, h, ws, rs, rule, hg))


@settings(max_examples=60, deadline=None)
@given(configs())
def test_pattern_groups_cover_exactly_the_spec_rows(cfg):
    """Every (pattern, head, row) the spans list is one the SPEC covers, each exactly once."""
    n, h, ws, rs, rule, hg = cfg
    covered = torch.zeros(len(ws), h, n, dtype=torch.long)
    for pg in pattern_groups(n, h, ws, rs, rule, hg):
        for span in row_spans(n, pg.segment, pg.dilation, pg.offset):
            for s in range(span.count):
                for kk in range(span.rows):
                    t = span.start + s * span.segment + pg.offset + pg.dilation * kk
                    for j in pg.heads:
                        covered[pg.pattern, j, t] += 1
    users = head_groups_of(h, len(ws), hg)
    for i, (w, r) in enumerate(zip(ws, rs)):
        W = min(w, n)
        offs = dict(zip(users[i], spec_offsets(rule, i, r, list(users[i]))))
        for j in range(h):
            for t in range(n):
                expected = int(j in offs and (t % W) % r == offs[j])
                assert covered[i, j, t] == expected, (i, j, t)


def test_explicit_offsets_by_head_or_by_group_member():
    ws, rs = [4, 8], [2, 4]
    by_head = [[1, 0, 1, 0], [3, 2, 1, 0]]
    c = count_matrix(9, 4, ws, rs, by_head, False)
    assert torch.equal(c, spec_counts(9, 4, ws, rs, by_head, False))
    # with head_groups, offsets[i] may list only the heads of group i (2 heads each here)
    c_groups = count_matrix(9, 4, ws, rs, [[1, 0], [3, 2]], True)
    c_full = count_matrix(9, 4, ws, rs, [[1, 0, 9, 9], [9, 9, 3, 2]], True)
    assert torch.equal(c_groups, c_full)


@pytest.mark.parametrize("n,W,r,o", [(10, 4, 3, 0), (10, 4, 3, 1), (10, 4, 3, 2), (3, 3, 5, 4), (1, 1, 2, 0)])
def test_row_spans_small(n, W, r, o):
    rows = sorted(
        sp.start + s * sp.segment + o + r * k
        for sp in row_spans(n, W, r, o)
        for s in range(sp.count)
        for k in range(sp.rows)
    )
    assert rows == [t for t in range(n) if (t % W) % r == o]
