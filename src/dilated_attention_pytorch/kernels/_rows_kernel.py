"""The Triton kernel behind :mod:`~dilated_attention_pytorch.kernels.triton_rows` (imports triton: loaded only
when a packed call runs on the GPU, or in Triton's interpreter)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rows_kernel(dst, src, index, start, stop, head_dim, s_dst, s_src, ADD: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Rows ``r`` in ``[start, stop)``: ``dst[r] = src[index[r]]``, or with ``ADD`` ``dst[index[r]] += src[r]``
    (summed in fp32; the indices of one launch must be distinct). Rows are ``head_dim`` contiguous elements
    ``s_*`` apart."""
    r = start + tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < stop
    at = tl.load(index + r, mask=ok, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = ok[:, None] & (d < head_dim)[None, :]
    if ADD:
        ptrs = dst + at[:, None] * s_dst + d[None, :]
        x = tl.load(src + r[:, None] * s_src + d[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
        tl.store(ptrs, (x + y).to(dst.dtype.element_ty), mask=m)
    else:
        x = tl.load(src + at[:, None] * s_src + d[None, :], mask=m, other=0.0)
        tl.store(dst + r[:, None] * s_dst + d[None, :], x, mask=m)
