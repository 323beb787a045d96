"""Triton kernels of :class:`~dilated_attention_pytorch.models.static_decoding.StaticDilatedKVCache`: one decode
step at fixed shapes, reading the row positions on the device (capturable in a CUDA graph).

Imported only when the Triton path runs (it imports triton). The cache's keys and values live in one flat store
``(b, rows, d)`` per tensor, split into lanes (one per (pattern, offset, key/value head) in use); the lane table
holds ``(w, r, o, first row, key/value head)`` per lane (int32, ``w``/``r``/``o`` clamped to the cache's
``max_length``, which changes no phase or index below it), the head table ``(patterns, h)`` the lane that query
head ``j`` reads through pattern ``i`` (``-1``: ``j`` does not use ``i``). Row ``b``'s token at position ``t``
is in lane ``(w, r, o)`` iff ``t % w % r == o``, at index ``(t % w) // r``; entries ``[0, (t % w) // r]`` of the
lane are then its segment's keys, so a step needs nothing but ``t``.

Attention is a flash-decoding split: one program per (key chunk of ``TILES`` tiles, pattern, batch row x key/value
head; an online softmax over its tiles, its query heads as the rows of tensor-core dots, no key loaded where no head
has keys) writes per query head the chunk's partial result (largest score, sum of weights, weighted sum of values, largest score of a key with a
non-finite value); a second kernel merges the partials by log-sum-exp (a key selected by ``C`` patterns lies in
``C`` lanes and counts ``C`` times: the full pass's merge). Non-finite values are kept out of the products; a
head gives NaN where it attends one with a nonzero weight, as ``attend_parts`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["append", "attend", "chunks"]


@triton.jit
def _lane_position(lane_tab, lane, t):
    """(first row, key/value head, in the lane's phase, index of position ``t`` in the lane)."""
    row = lane_tab + 5 * lane
    w = tl.load(row)
    r = tl.load(row + 1)
    off = tl.load(row + 2)
    within = t % w
    return tl.load(row + 3), tl.load(row + 4), (within % r) == off, within // r


@triton.jit
def _append_kernel(k_new, v_new, k_store, v_store, pos_ptr, lane_tab, head_dim,
                   s_nb, s_nh, s_sb, s_sr, BLOCK_D: tl.constexpr):
    """Grid (lanes, b): write row ``b``'s new key/value into the lane when the token is in its phase."""
    lane = tl.program_id(0)
    bb = tl.program_id(1)
    t = tl.load(pos_ptr + bb).to(tl.int32)
    base, kv, active, idx = _lane_position(lane_tab, lane, t)
    dd = tl.arange(0, BLOCK_D)
    ok = dd < tl.where(active, head_dim, 0)  # nothing to write out of phase
    src = bb.to(tl.int64) * s_nb + kv.to(tl.int64) * s_nh + dd
    dst = bb.to(tl.int64) * s_sb + (base + idx).to(tl.int64) * s_sr + dd
    tl.store(k_store + dst, tl.load(k_new + src, mask=ok), mask=ok)
    tl.store(v_store + dst, tl.load(v_new + src, mask=ok), mask=ok)


@triton.jit
def _attend_kernel(q_ptr, k_store, v_store, pos_ptr, lane_tab, head_tab, m_ptr, l_ptr, bad_ptr, acc_ptr,
                   scale, num_heads, num_kv_heads, group, num_patterns, num_chunks, head_dim, s_qb, s_qh, s_sb, s_sr,
                   BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr, BLOCK_D: tl.constexpr,
                   IEEE: tl.constexpr):
    """Grid (chunks, patterns, b * h_kv): chunk ``c`` (``TILES`` tiles of ``BLOCK_K`` keys, an online softmax over
    them) of the lane that the ``group`` query heads of key/value head ``kv`` of row ``b`` read through pattern
    ``i``, the heads as the rows of tensor-core dots. The heads whose offset is the row's phase read one lane
    (the slot of that offset, key/value head ``kv``); the others have no keys here. A program without keys (no
    such head, or the lane shorter than its chunk) loads no key."""
    c = tl.program_id(0)
    i = tl.program_id(1)
    bkv = tl.program_id(2)
    bb = bkv // num_kv_heads
    gg = tl.arange(0, BLOCK_G)
    g_ok = gg < group
    j = (bkv % num_kv_heads) * group + gg  # query heads
    lane = tl.load(head_tab + i * num_heads + j, mask=g_ok, other=-1)
    t = tl.load(pos_ptr + bb).to(tl.int32)
    row = lane_tab + 5 * tl.maximum(lane, 0)
    within = t % tl.load(row)
    active = (lane >= 0) & (within % tl.load(row + 1) == tl.load(row + 2))  # (G,)
    valid = tl.max(tl.where(active, within // tl.load(row + 1) + 1, 0), axis=0)  # the active heads' one lane
    base = tl.max(tl.where(active, tl.load(row + 3), 0), axis=0)
    first = c * (BLOCK_K * TILES)
    tiles = tl.minimum(tl.maximum(valid - first, 0) + BLOCK_K - 1, BLOCK_K * TILES) // BLOCK_K
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < head_dim
    q = tl.load(q_ptr + bb.to(tl.int64) * s_qb + j[:, None] * s_qh + dd[None, :], mask=g_ok[:, None] & d_ok[None, :],
                other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # largest finite score so far
    l_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    bad_max = tl.full([BLOCK_G], float("-inf"), tl.float32)  # largest score of a key with a non-finite value
    nan = tl.zeros([BLOCK_G], dtype=tl.int32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for tile in range(0, tiles):
        kk = first + tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = kk < valid
        ok = k_ok[:, None] & d_ok[None, :]
        offs = bb.to(tl.int64) * s_sb + (base + kk).to(tl.int64)[:, None] * s_sr + dd[None, :]
        keys = tl.load(k_store + offs, mask=ok, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale  # (G, K)
        else:
            s = tl.dot(q, tl.trans(keys)) * scale
        seen = active[:, None] & k_ok[None, :]
        nan = nan | tl.max(((s != s) & seen).to(tl.int32), axis=1)
        s = tl.where(seen & (s == s), s, float("-inf"))  # a NaN score is flagged, kept out of the sums
        m_new = tl.maximum(m, tl.max(s, axis=1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - safe)
        p = tl.exp(s - safe[:, None])  # keys not seen: 0
        vals = tl.load(v_store + offs, mask=ok, other=0.0)
        finite = (vals == vals) & (tl.abs(vals.to(tl.float32)) != float("inf"))
        bad = tl.max((~finite).to(tl.int32), axis=1) > 0  # (K,): a non-finite value, kept out of the product
        clean = tl.where(finite, vals, 0.0).to(vals.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), clean, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), clean)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        bad_max = tl.maximum(bad_max, tl.max(tl.where(bad[None, :], s, float("-inf")), axis=1))
        m = m_new
    out = ((bb * num_heads + j) * num_patterns + i) * num_chunks + c  # (G,)
    tl.store(m_ptr + out, tl.where(nan > 0, float("nan"), m), mask=g_ok)
    tl.store(l_ptr + out, l_sum, mask=g_ok)
    tl.store(bad_ptr + out, bad_max, mask=g_ok)
    tl.store(acc_ptr + out.to(tl.int64)[:, None] * head_dim + dd[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, bad_ptr, acc_ptr, out_ptr, parts, head_dim, num_heads, s_ob, s_oh,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (b * h): merge the ``parts`` partial results of one query head by log-sum-exp; zeros without keys,
    NaN where a NaN score was seen or a non-finite value got a nonzero weight."""
    bh = tl.program_id(0)
    first = bh.to(tl.int64) * parts
    ss = tl.arange(0, BLOCK_S)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < head_dim
    mx = tl.full([BLOCK_S], float("-inf"), tl.float32)
    nan = tl.zeros([BLOCK_S], dtype=tl.int32)
    for s0 in range(0, parts, BLOCK_S):  # pass 1: the largest score (NaN if any partial saw one)
        m = tl.load(m_ptr + first + s0 + ss, mask=s0 + ss < parts, other=float("-inf"))
        nan = nan | (m != m).to(tl.int32)
        mx = tl.maximum(mx, m)
    big = tl.max(mx, axis=0)
    big = tl.where(tl.max(nan, axis=0) > 0, float("nan"), big)
    shift = tl.where(big == float("-inf"), 0.0, big)
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    attends_bad = tl.zeros([BLOCK_S], dtype=tl.int32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, parts, BLOCK_S):  # pass 2: weights relative to the largest score
        s_ok = s0 + ss < parts
        idx = first + s0 + ss
        wgt = tl.exp(tl.load(m_ptr + idx, mask=s_ok, other=float("-inf")) - shift)
        total += tl.load(l_ptr + idx, mask=s_ok, other=0.0) * wgt
        attends_bad = attends_bad | (tl.exp(tl.load(bad_ptr + idx, mask=s_ok, other=float("-inf")) - shift) > 0).to(
            tl.int32)
        part = tl.load(acc_ptr + idx[:, None] * head_dim + dd[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc += part * wgt[:, None]
    total_sum = tl.sum(total, axis=0)  # 0 only without keys (every weight 0): the output is 0 / 1
    out = tl.sum(acc, axis=0) / tl.where(total_sum > 0, total_sum, 1.0)  # a NaN sum stays NaN
    out = tl.where(tl.max(attends_bad, axis=0) > 0, float("nan"), out)
    bb = bh // num_heads
    j = bh % num_heads
    tl.store(out_ptr + bb.to(tl.int64) * s_ob + j * s_oh + dd, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


TILES = 4  # tiles of block_k keys per program: fewer programs (and partial results) than one tile each


def chunks(longest_lane: int, block_k: int, tiles: int = TILES) -> int:
    """Key chunks (programs) per (row, key/value head, pattern): enough for the longest lane."""
    return max(1, -(-longest_lane // (block_k * tiles)))


def append(k_new: torch.Tensor, v_new: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor,
           positions: torch.Tensor, lane_tab: torch.Tensor) -> None:
    """Write the new keys/values ``(b, h_kv, d)`` (unit stride in ``d``) into the lanes of their phase."""
    b, _, d = k_new.shape
    _append_kernel[(lane_tab.shape[0], b)](
        k_new, v_new, k_store, v_store, positions, lane_tab, d, *k_new.stride()[:2], *k_store.stride()[:2],
        BLOCK_D=_block_d(d),
    )


def attend(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, positions: torch.Tensor,
           lane_tab: torch.Tensor, head_tab: torch.Tensor, partials: tuple[torch.Tensor, ...], scale: float,
           block_k: int, num_kv_heads: int, tiles: int = TILES) -> torch.Tensor:
    """q ``(b, h, d)`` (unit stride in ``d``, the stores' dtype) at the rows' positions -> out ``(b, h, d)``.
    ``partials``: float32 buffers ``m, l, bad (b * h * patterns * chunks,)`` and ``acc (..., d)``."""
    b, h, d = q.shape
    num_patterns = head_tab.shape[0]
    m, l_sum, bad, acc = partials
    num_chunks = m.numel() // (b * h * num_patterns)
    block_d = _block_d(d)
    group = h // num_kv_heads
    _attend_kernel[(num_chunks, num_patterns, b * num_kv_heads)](
        q, k_store, v_store, positions, lane_tab, head_tab, m, l_sum, bad, acc,
        scale, h, num_kv_heads, group, num_patterns, num_chunks, d, *q.stride()[:2], *k_store.stride()[:2],
        BLOCK_G=max(16, 1 << (group - 1).bit_length()), BLOCK_K=block_k, TILES=tiles, BLOCK_D=block_d,
        IEEE=q.dtype == torch.float32, num_warps=4,
    )
    out = torch.empty_like(q)
    parts = num_patterns * num_chunks
    _combine_kernel[(b * h,)](m, l_sum, bad, acc, out, parts, d, h, *out.stride()[:2],
                              BLOCK_S=min(64, max(16, 1 << (parts - 1).bit_length())), BLOCK_D=block_d, num_warps=4)
    return out
