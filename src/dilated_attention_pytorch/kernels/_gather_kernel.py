"""The Triton kernel behind :func:`~dilated_attention_pytorch.kernels.triton_gather.gather_blocks`.

Imported only when the fused path runs (it imports triton).

A program merges ``BLOCK_T`` consecutive tokens of one head. Which block row holds token ``t`` of a
pattern (segment ``t // W``, offset test ``(t mod W) mod r``, row ``(t mod W) // r``) is worked out
once per program and pattern in scalars, so that per row only small-number arithmetic is left:
integer division by a runtime value costs about twenty instructions per row, and before this the
kernel spent more time issuing index arithmetic than moving bytes (Nsight Compute on an H200: SM
throughput 67%, DRAM 25%, 96 registers per thread).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _small_divmod(num, r, inv_r):
    """(num // r, num % r) for 0 <= num < 2**21 through fp32 (exact in that range)."""
    q = ((num.to(tl.float32) + 0.5) * inv_r).to(tl.int32)
    return q, num - q * r


@triton.jit
def _locate(t0, k, t_ok, i, j, pat_tab, head_tab, num_heads, BLOCK_T: tl.constexpr):
    """Rows ``t0 + k`` of head ``j`` in pattern ``i``: (covered, in a full segment, segment, row)."""
    seg_len = tl.load(pat_tab + 3 * i).to(tl.int32)
    r = tl.load(pat_tab + 3 * i + 1).to(tl.int32)
    full = tl.load(pat_tab + 3 * i + 2).to(tl.int32)
    hrow = head_tab + 4 * (i * num_heads + j)
    off = tl.load(hrow).to(tl.int32)
    inv_r = 1.0 / r.to(tl.float32)
    seg0 = t0 // seg_len  # scalars: the program's first token
    w0 = t0 - seg0 * seg_len
    if seg_len >= BLOCK_T:  # at most one segment boundary among the program's tokens, at lane k1
        k1 = seg_len - w0
        nxt = k >= k1
        seg = seg0 + nxt.to(tl.int32)
        # (within - off + r) = r * q + rem with small operands: a scalar division for the lanes of
        # the first segment, and none for those of the next (their within is k - k1 < BLOCK_T)
        a = w0 - off + r
        qa = a // r
        num = tl.where(nxt, k - k1 + r - off, a - qa * r + k)
        q, rem = _small_divmod(num, r, inv_r)
        row = tl.where(nxt, 0, qa) + q - 1
    else:  # segments shorter than the program's tokens: per-row division
        t = t0 + k
        seg = t // seg_len
        within = t - seg * seg_len
        rem = within % r - off
        row = within // r
    in_full = seg < full
    bid = tl.where(in_full, tl.load(hrow + 2), tl.load(hrow + 3)).to(tl.int32)
    ok = t_ok & (rem == 0) & (bid >= 0)
    return ok, in_full, seg, row.to(tl.int64)


@triton.jit
def _row_ptrs(ptr_tab, stride_tab, hrow, in_full, row_b, hpos, row, elem_ty: tl.constexpr):
    """Pointers to the rows of a pattern's full-segment or tail block (tables read as scalars)."""
    bf = tl.maximum(tl.load(hrow + 2), 0)
    bt = tl.maximum(tl.load(hrow + 3), 0)
    base = tl.where(in_full, tl.load(ptr_tab + bf), tl.load(ptr_tab + bt))
    sb = tl.where(in_full, tl.load(stride_tab + 3 * bf), tl.load(stride_tab + 3 * bt))
    sh = tl.where(in_full, tl.load(stride_tab + 3 * bf + 1), tl.load(stride_tab + 3 * bt + 1))
    sl = tl.where(in_full, tl.load(stride_tab + 3 * bf + 2), tl.load(stride_tab + 3 * bt + 2))
    return base.to(tl.pointer_type(elem_ty)) + (row_b * sb + hpos * sh + row * sl)


@triton.jit
def gather_kernel(
    out_ptr, lse_out_ptr, src_tab, src_strides, lse_tab, lse_strides, pat_tab, head_tab,
    m_len, num_heads, num_patterns, head_dim,
    s_ob, s_ot, s_oh, s_lb, s_lt, s_lh,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One pass over the patterns (a loop, not unrolled: unrolled, every pattern's rows and pointers
    are live at once) with a running maximum, as in online softmax: each covering pattern's LSE and
    output row are read once."""
    pid_t = tl.program_id(0)
    jt = tl.program_id(1)
    bb = tl.program_id(2)
    t0 = pid_t * BLOCK_T
    k = tl.arange(0, BLOCK_T)
    t_ok = t0 + k < m_len
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < head_dim
    elem = out_ptr.dtype.element_ty
    mx = tl.full([BLOCK_T], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for i in range(num_patterns):
        ok, in_full, seg, row = _locate(t0, k, t_ok, i, jt, pat_tab, head_tab, num_heads, BLOCK_T)
        full = tl.load(pat_tab + 3 * i + 2)
        row_b = tl.where(in_full, bb * full + seg, bb).to(tl.int64)
        hrow = head_tab + 4 * (i * num_heads + jt)
        hpos = tl.load(hrow + 1)
        lse = tl.load(_row_ptrs(lse_tab, lse_strides, hrow, in_full, row_b, hpos, row, tl.float32), mask=ok,
                      other=float("-inf"))
        src = _row_ptrs(src_tab, src_strides, hrow, in_full, row_b, hpos, row, elem)
        rows = tl.load(src[:, None] + dd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        new_mx = tl.maximum(mx, lse)
        safe = tl.where(new_mx == float("-inf"), 0.0, new_mx)
        alpha = tl.exp(mx - safe)  # 0 while nothing covered the row
        beta = tl.exp(lse - safe)  # 0 where this pattern does not cover it
        total = total * alpha + beta
        acc = acc * alpha[:, None] + rows.to(tl.float32) * beta[:, None]
        mx = new_mx
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    big_l = safe + tl.log(total)  # -inf where no pattern covers the row
    acc = acc / tl.where(total > 0, total, 1.0)[:, None]
    t64 = (t0 + k).to(tl.int64)
    o_ptrs = out_ptr + bb.to(tl.int64) * s_ob + t64[:, None] * s_ot + jt * s_oh + dd[None, :]
    tl.store(o_ptrs, acc.to(elem), mask=t_ok[:, None] & d_ok[None, :])
    tl.store(lse_out_ptr + bb.to(tl.int64) * s_lb + t64 * s_lt + jt * s_lh, big_l, mask=t_ok)
