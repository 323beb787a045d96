"""The Triton kernel behind :func:`~dilated_attention_pytorch.kernels.triton_gather.gather_blocks`.

Imported only when the fused path runs (it imports triton).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _locate(t, t_ok, bb, i, j, pat_tab, head_tab, num_heads):
    """Where row ``t`` of head ``j`` lies among pattern ``i``'s blocks: (covered, block id, batch row,
    head position, row) — 32-bit index arithmetic, 64-bit rows for addressing. Row ``t`` is position
    ``u = t + phase`` from the start of the pattern's first segment: segment 0 is a head block when the
    phase is not 0 (it began before row 0), then ``full`` whole segments (one block, batched), then a tail
    block (the last segment, cut by the end of the rows or of the sequence)."""
    seg_len = tl.load(pat_tab + 4 * i).to(tl.int32)
    r = tl.load(pat_tab + 4 * i + 1).to(tl.int32)
    phase = tl.load(pat_tab + 4 * i + 2).to(tl.int32)
    full = tl.load(pat_tab + 4 * i + 3).to(tl.int32)
    hrow = head_tab + 5 * (i * num_heads + j)
    off = tl.load(hrow).to(tl.int32)
    hpos = tl.load(hrow + 1).to(tl.int32)
    u = t + phase
    seg = u // seg_len
    within = u - seg * seg_len
    f0 = (phase > 0).to(tl.int32)  # index of the first whole segment
    is_head = seg < f0
    in_full = (seg >= f0) & (seg - f0 < full)
    bid = tl.where(is_head, tl.load(hrow + 4), tl.where(in_full, tl.load(hrow + 2), tl.load(hrow + 3))).to(tl.int32)
    ok = t_ok & (within % r == off) & (bid >= 0)
    row_b = tl.where(in_full, bb * full + seg - f0, bb).to(tl.int64)
    skipped = tl.where(is_head, (phase - off + r - 1) // r, 0)  # the head block's rows before row 0
    return ok, bid, row_b, hpos, (within // r - skipped).to(tl.int64)


@triton.jit
def _offset(strides, bid, ok, row_b, hpos, row_k):
    """Element offset of (batch row, head, row) in block ``bid`` from its (B, H, L) strides."""
    sb = tl.load(strides + 3 * bid, mask=ok, other=0)
    sh = tl.load(strides + 3 * bid + 1, mask=ok, other=0)
    sl = tl.load(strides + 3 * bid + 2, mask=ok, other=0)
    return row_b * sb + hpos * sh + row_k * sl


@triton.jit
def gather_kernel(
    out_ptr, lse_out_ptr, shift_ptr, total_ptr, src_tab, src_strides, lse_tab, lse_strides, pat_tab, head_tab,
    m_len, num_heads, num_patterns, head_dim,
    s_ob, s_ot, s_oh, s_lb, s_lt, s_lh,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_STATS: tl.constexpr,
):
    """Two passes over the patterns, each a loop (not unrolled: a pattern's row pointers alone fill
    the registers): the largest LSE ``m`` and ``Σ exp(l_i - m)`` from the patterns' LSEs, then the
    weighted sum ``Σ exp(l_i - m) O_i / Σ exp(l_i - m)`` of their rows. Weights are relative to ``m``,
    never to the merged LSE, whose rounding at large logits they would carry (see ``merge.py``). A NaN
    LSE propagates (NaN output and LSE); ``-inf`` is a pattern with no keys. ``WRITE_STATS``: also
    write ``m`` (0 where no pattern has keys) and the sum of weights (for the exact backward)."""
    pid_t = tl.program_id(0)
    jt = tl.program_id(1)
    bb = tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < m_len
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < head_dim
    elem = out_ptr.dtype.element_ty
    mx = tl.full([BLOCK_T], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    for i in range(num_patterns):  # pass 1: the largest LSE and the sum of weights, online
        ok, bid, row_b, hpos, row_k = _locate(t, t_ok, bb, i, jt, pat_tab, head_tab, num_heads)
        base = tl.load(lse_tab + bid, mask=ok, other=0).to(tl.pointer_type(tl.float32))
        lse = tl.load(base + _offset(lse_strides, bid, ok, row_b, hpos, row_k), mask=ok, other=float("-inf"))
        new_mx = tl.maximum(mx, lse, propagate_nan=tl.PropagateNan.ALL)
        safe = tl.where(new_mx == float("-inf"), 0.0, new_mx)
        total = total * tl.exp(mx - safe) + tl.exp(lse - safe)
        mx = new_mx
    shift = tl.where(mx == float("-inf"), 0.0, mx)  # NaN stays NaN
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for i in range(num_patterns):  # pass 2: the weighted sum of the covering rows
        ok, bid, row_b, hpos, row_k = _locate(t, t_ok, bb, i, jt, pat_tab, head_tab, num_heads)
        base = tl.load(src_tab + bid, mask=ok, other=0).to(tl.pointer_type(elem))
        offs = _offset(src_strides, bid, ok, row_b, hpos, row_k)
        rows = tl.load((base + offs)[:, None] + dd[None, :], mask=ok[:, None] & d_ok[None, :],
                       other=0.0).to(tl.float32)
        lbase = tl.load(lse_tab + bid, mask=ok, other=0).to(tl.pointer_type(tl.float32))
        lse = tl.load(lbase + _offset(lse_strides, bid, ok, row_b, hpos, row_k), mask=ok, other=float("-inf"))
        acc += rows * tl.exp(lse - shift)[:, None]
    acc = acc / tl.where(total > 0, total, 1.0)[:, None]  # no keys: 0 / 1; NaN stays NaN
    big_l = shift + tl.log(total)  # -inf where no pattern covers the row
    t64 = t.to(tl.int64)
    o_ptrs = out_ptr + bb.to(tl.int64) * s_ob + t64[:, None] * s_ot + jt * s_oh + dd[None, :]
    tl.store(o_ptrs, acc.to(elem), mask=t_ok[:, None] & d_ok[None, :])
    l_off = bb.to(tl.int64) * s_lb + t64 * s_lt + jt * s_lh
    tl.store(lse_out_ptr + l_off, big_l, mask=t_ok)
    if WRITE_STATS:
        tl.store(shift_ptr + l_off, shift, mask=t_ok)
        tl.store(total_ptr + l_off, total, mask=t_ok)
