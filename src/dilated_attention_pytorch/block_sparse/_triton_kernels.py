"""Triton kernels of block-sparse attention: forward, the backward's row sums, and the backward.

Imported only when the Triton path runs (it imports triton). Tensors are ``(b, n, heads, d)`` with
unit stride in ``d``; LSE and the backward's row sums are ``(b, h, n)`` float32, contiguous.

Each query tile walks the key blocks its layout row lists (each key tile of a key block in turn),
with an online softmax in base 2; each key tile of the backward walks the query blocks that list its
key block (the transposed layout). Lists come in two parts: *partial* blocks, whose tiles evaluate a
token mask (the causal diagonal, keys past the end), and *full* blocks, whose tiles skip it.

``USE_TMA`` picks how tiles are loaded: 0 masked pointer loads; 1 host-made 4-d tensor descriptors over
``(b, n, heads, d)`` (Hopper's bulk copy engine; rows past the end read as zeros); 2 2-d descriptors
over the ``(b * n, heads * d)`` view, whose tiles need no reshape (only where ``d`` is the tile width
and no tile crosses from one batch entry into the next).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(ptr_or_desc, b, row0, head, n, stride_b, stride_n, stride_h, d,
          ROWS: tl.constexpr, DP: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows ``row0 .. row0 + ROWS`` of ``[b, :, head, :]`` as a (ROWS, DP) tile; zeros past the ends."""
    if USE_TMA == 2:
        return ptr_or_desc.load([b * n + row0, head * DP])
    elif USE_TMA == 1:
        return ptr_or_desc.load([b, row0, head, 0]).reshape(ROWS, DP)
    else:
        return tl.load(*_tile_ptrs(ptr_or_desc, b, row0, head, n, stride_b, stride_n, stride_h, d, ROWS, DP),
                       other=0.0)


@triton.jit
def _tile_ptrs(ptr, b, row0, head, n, stride_b, stride_n, stride_h, d, ROWS: tl.constexpr, DP: tl.constexpr):
    """Pointers and in-bounds mask of a (ROWS, DP) tile of ``[b, :, head, :]``. Offsets in int64: a
    (b, n, h, d) tensor passes 2**31 elements at n = 1M tokens with h = 16, d = 128."""
    rows = (row0 + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, DP)
    ptrs = ptr + b.to(tl.int64) * stride_b + head * stride_h + rows[:, None] * stride_n + cols[None, :]
    return ptrs, (rows[:, None] < n) & (cols[None, :] < d)


@triton.jit
def _store_tile(ptr, value, b, row0, head, n, stride_b, stride_n, stride_h, d, ROWS: tl.constexpr, DP: tl.constexpr):
    ptrs, mask = _tile_ptrs(ptr, b, row0, head, n, stride_b, stride_n, stride_h, d, ROWS, DP)
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _key_ok(offs_m, start_n, n, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(queries, keys) mask of a key tile: keys before the end, and not after the query under causal."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    ok = offs_n[None, :] < n
    if IS_CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    return ok


@triton.jit
def _first(PHASE, num, ALIGN: tl.constexpr):
    """Where this program starts walking its list of ``num`` blocks: at its phase's share of the list
    (then round to the start), so that the programs running at one time walk nearby blocks (see
    ``triton_path.start_phases``); 0 without ``ALIGN``."""
    if ALIGN:
        prog = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
        return tl.minimum((tl.load(PHASE + prog) * num).to(tl.int32), tl.maximum(num - 1, 0))
    else:
        return 0


@triton.jit
def _block(idx_ptr, i, first, num, TILES: tl.constexpr):
    """Block index of step ``i`` of a walk that starts at list entry ``first`` and wraps around."""
    j = i // TILES + first
    return tl.load(idx_ptr + tl.where(j >= num, j - num, j))


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, idx_ptr, num, first, b, hk, offs_m, n, d, qk_scale,
               skb, skn, skh, svb, svn, svh,
               MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr,
               SPARSE_BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    TILES: tl.constexpr = SPARSE_BLOCK // BLOCK_N
    for i in tl.range(0, num * TILES):
        start_n = _block(idx_ptr, i, first, num, TILES) * SPARSE_BLOCK + (i % TILES) * BLOCK_N
        k = _tile(K, b, start_n, hk, n, skb, skn, skh, d, BLOCK_N, DP, USE_TMA)
        v = _tile(V, b, start_n, hk, n, svb, svn, svh, d, BLOCK_N, DP, USE_TMA)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK:
            qk = tl.where(_key_ok(offs_m, start_n, n, BLOCK_N, IS_CAUSAL), qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def block_sparse_fwd(
    Q, K, V, O, LSE,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
    PART_NUM, PART_IDX, FULL_NUM, FULL_IDX, s_num_h, s_idx_h, s_idx_r, PHASE,
    n, d, H, GROUP, LAYOUT_HEAD_STRIDE, qk_scale,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr,
    SPARSE_BLOCK: tl.constexpr, USE_TMA: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head). Writes O and the LSE (natural log)."""
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    hq = bh % H
    hk = hq // GROUP
    start_m = qt * BLOCK_M
    row = start_m // SPARSE_BLOCK
    lh = hq * LAYOUT_HEAD_STRIDE
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _tile(Q, b, start_m, hq, n, sqb, sqn, sqh, d, BLOCK_M, DP, USE_TMA)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    num = tl.load(PART_NUM + lh * s_num_h + row)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, PART_IDX + lh * s_idx_h + row * s_idx_r, num, 0, b, hk, offs_m,
                               n, d, qk_scale, skb, skn, skh, svb, svn, svh,
                               True, IS_CAUSAL, BLOCK_N, DP, SPARSE_BLOCK, USE_TMA)
    num = tl.load(FULL_NUM + lh * s_num_h + row)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, FULL_IDX + lh * s_idx_h + row * s_idx_r, num,
                               _first(PHASE, num, ALIGN), b, hk, offs_m,
                               n, d, qk_scale, skb, skn, skh, svb, svn, svh,
                               False, IS_CAUSAL, BLOCK_N, DP, SPARSE_BLOCK, USE_TMA)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    _store_tile(O, acc / l_safe[:, None], b, start_m, hq, n, sob, son, soh, d, BLOCK_M, DP)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + bh.to(tl.int64) * n + offs_m, lse, mask=offs_m < n)


@triton.jit
def block_sparse_row_sums(
    O, DO, GLSE, DELTA, sob, son, soh, sdb, sdn, sdh, n, d, H,
    HAS_GLSE: tl.constexpr, BLOCK: tl.constexpr, DP: tl.constexpr,
):
    """DELTA[b, h, t] = sum_d O * dO  (minus the LSE's incoming gradient, when there is one)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = pid * BLOCK
    o = _tile(O, b, start, h, n, sob, son, soh, d, BLOCK, DP, False).to(tl.float32)
    do = _tile(DO, b, start, h, n, sdb, sdn, sdh, d, BLOCK, DP, False).to(tl.float32)
    delta = tl.sum(o * do, 1)
    offs = start + tl.arange(0, BLOCK)
    if HAS_GLSE:
        delta -= tl.load(GLSE + bh.to(tl.int64) * n + offs, mask=offs < n, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * n + offs, delta, mask=offs < n)


@triton.jit
def _row_stats(LSE, DELTA, bh, offs_m, n, EVEN_N: tl.constexpr):
    """Base-2 LSE (+inf where a row is past the end or sees nothing: its probabilities become 0) and
    the row sums. ``EVEN_N``: n is a multiple of every tile, so no row is past the end."""
    row = bh.to(tl.int64) * n + offs_m
    if EVEN_N:
        lse = tl.load(LSE + row)
        delta = tl.load(DELTA + row)
    else:
        lse = tl.load(LSE + row, mask=offs_m < n, other=float("inf"))
        delta = tl.load(DELTA + row, mask=offs_m < n, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    return lse, delta


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, idx_ptr, num, first, b, hq, bhq, offs_n, n, d, qk_scale,
                sqb, sqn, sqh, sdb, sdn, sdh,
                MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, DP: tl.constexpr,
                SPARSE_BLOCK: tl.constexpr, USE_TMA: tl.constexpr, EVEN_N: tl.constexpr):
    TILES: tl.constexpr = SPARSE_BLOCK // BLOCK_M
    for i in tl.range(0, num * TILES):
        start_m = _block(idx_ptr, i, first, num, TILES) * SPARSE_BLOCK + (i % TILES) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _tile(Q, b, start_m, hq, n, sqb, sqn, sqh, d, BLOCK_M, DP, USE_TMA)
        lse, delta = _row_stats(LSE, DELTA, bhq, offs_m, n, EVEN_N)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (keys, queries)
        if MASK:
            ok = offs_n[:, None] < n
            if IS_CAUSAL:
                ok = ok & (offs_n[:, None] <= offs_m[None, :])
            p_t = tl.where(ok, p_t, 0.0)
        do = _tile(DO, b, start_m, hq, n, sdb, sdn, sdh, d, BLOCK_M, DP, USE_TMA)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk)
    return dk, dv


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, idx_ptr, num, first, b, hk, offs_m, n, d, qk_scale,
              skb, skn, skh, svb, svn, svh,
              MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr,
              SPARSE_BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    TILES: tl.constexpr = SPARSE_BLOCK // BLOCK_N
    for i in tl.range(0, num * TILES):
        start_n = _block(idx_ptr, i, first, num, TILES) * SPARSE_BLOCK + (i % TILES) * BLOCK_N
        k = _tile(K, b, start_n, hk, n, skb, skn, skh, d, BLOCK_N, DP, USE_TMA)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASK:
            p = tl.where(_key_ok(offs_m, start_n, n, BLOCK_N, IS_CAUSAL), p, 0.0)
        v = _tile(V, b, start_n, hk, n, svb, svn, svh, d, BLOCK_N, DP, USE_TMA)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def block_sparse_bwd(
    Q, K, V, DO, Q2, K2, V2, DO2, DQ, DK, DV, LSE, DELTA,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdb, sdn, sdh,
    sdqb, sdqn, sdqh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
    KV_PART_NUM, KV_PART_IDX, KV_FULL_NUM, KV_FULL_IDX,
    Q_PART_NUM, Q_PART_IDX, Q_FULL_NUM, Q_FULL_IDX, s_num_h, s_idx_h, s_idx_r, PHASE,
    n, d, H, H_KV, GROUP: tl.constexpr, LAYOUT_HEAD_STRIDE, qk_scale, scale, KV_TILES, Q_TILES,
    IS_CAUSAL: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr,
    BLOCK_N2: tl.constexpr, DP: tl.constexpr, SPARSE_BLOCK: tl.constexpr, USE_TMA: tl.constexpr,
    EVEN_N: tl.constexpr, ALIGN: tl.constexpr, PROGRAMS: tl.constexpr,
):
    """Programs ``0 .. KV_TILES``: dK, dV of BLOCK_N1 keys of one (batch, kv head), over the query
    blocks (of every head in its group) that list their key block; then programs ``KV_TILES ..``: dQ of
    BLOCK_M2 queries of one (batch, query head) over the key blocks its row lists. ``PROGRAMS`` 1 or 2
    launches only the first or the second kind (each then needs fewer registers; pass KV_TILES 0 for
    the second), 0 both. ``Q``, ``K``, ``V``, ``DO`` are the first kind's operands (tiles of BLOCK_M1 /
    BLOCK_N1 rows), ``Q2 .. DO2`` the second's (BLOCK_M2 / BLOCK_N2); without TMA both are the same
    pointers. No atomics: every gradient element is written by one program, so the result is
    bit-reproducible."""
    pid = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // H_KV
    hk = bhk % H_KV
    if PROGRAMS == 0:
        first_kind = pid < KV_TILES
    else:
        first_kind = PROGRAMS == 1  # known at compile time: the other kind's code is left out
    if first_kind:
        _dkdv_program(pid, b, hk, Q, K, V, DO, DK, DV, LSE, DELTA, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                      sdb, sdn, sdh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
                      Q_PART_NUM, Q_PART_IDX, Q_FULL_NUM, Q_FULL_IDX, s_num_h, s_idx_h, s_idx_r, PHASE,
                      n, d, H, GROUP, LAYOUT_HEAD_STRIDE, qk_scale, scale,
                      IS_CAUSAL, BLOCK_M1, BLOCK_N1, DP, SPARSE_BLOCK, USE_TMA, EVEN_N, ALIGN)
    else:
        _dq_program(pid - KV_TILES, b, hk, Q2, K2, V2, DO2, DQ, LSE, DELTA, sqb, sqn, sqh, skb, skn, skh, svb, svn,
                    svh, sdb, sdn, sdh, sdqb, sdqn, sdqh, KV_PART_NUM, KV_PART_IDX, KV_FULL_NUM, KV_FULL_IDX,
                    s_num_h, s_idx_h, s_idx_r, PHASE, n, d, H, GROUP, LAYOUT_HEAD_STRIDE, qk_scale, scale, Q_TILES,
                    IS_CAUSAL, BLOCK_M2, BLOCK_N2, DP, SPARSE_BLOCK, USE_TMA, EVEN_N, ALIGN)


@triton.jit
def _dq_program(off, b, hk, Q2, K2, V2, DO2, DQ, LSE, DELTA, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                sdb, sdn, sdh, sdqb, sdqn, sdqh, KV_PART_NUM, KV_PART_IDX, KV_FULL_NUM, KV_FULL_IDX,
                s_num_h, s_idx_h, s_idx_r, PHASE, n, d, H, GROUP: tl.constexpr, LAYOUT_HEAD_STRIDE, qk_scale, scale,
                Q_TILES, IS_CAUSAL: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, DP: tl.constexpr,
                SPARSE_BLOCK: tl.constexpr, USE_TMA: tl.constexpr, EVEN_N: tl.constexpr, ALIGN: tl.constexpr):
    """dQ of query tile ``off % Q_TILES`` of query head ``off // Q_TILES`` of kv head ``hk``'s group."""
    hq = hk * GROUP + off // Q_TILES
    start_m = (off % Q_TILES) * BLOCK_M2
    row = start_m // SPARSE_BLOCK
    bhq = b * H + hq
    lh = hq * LAYOUT_HEAD_STRIDE
    offs_m = start_m + tl.arange(0, BLOCK_M2)
    q = _tile(Q2, b, start_m, hq, n, sqb, sqn, sqh, d, BLOCK_M2, DP, USE_TMA)
    do = _tile(DO2, b, start_m, hq, n, sdb, sdn, sdh, d, BLOCK_M2, DP, USE_TMA)
    lse, delta = _row_stats(LSE, DELTA, bhq, offs_m, n, EVEN_N)
    dq = tl.zeros([BLOCK_M2, DP], tl.float32)
    num = tl.load(KV_PART_NUM + lh * s_num_h + row)
    dq = _dq_tiles(dq, q, do, lse, delta, K2, V2, KV_PART_IDX + lh * s_idx_h + row * s_idx_r, num, 0, b, hk, offs_m,
                   n, d, qk_scale, skb, skn, skh, svb, svn, svh,
                   True, IS_CAUSAL, BLOCK_N2, DP, SPARSE_BLOCK, USE_TMA)
    num = tl.load(KV_FULL_NUM + lh * s_num_h + row)
    dq = _dq_tiles(dq, q, do, lse, delta, K2, V2, KV_FULL_IDX + lh * s_idx_h + row * s_idx_r, num,
                   _first(PHASE, num, ALIGN), b, hk, offs_m,
                   n, d, qk_scale, skb, skn, skh, svb, svn, svh,
                   False, IS_CAUSAL, BLOCK_N2, DP, SPARSE_BLOCK, USE_TMA)
    _store_tile(DQ, dq * scale, b, start_m, hq, n, sdqb, sdqn, sdqh, d, BLOCK_M2, DP)


@triton.jit
def _dkdv_program(pid, b, hk, Q, K, V, DO, DK, DV, LSE, DELTA, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh,
                  sdb, sdn, sdh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
                  Q_PART_NUM, Q_PART_IDX, Q_FULL_NUM, Q_FULL_IDX, s_num_h, s_idx_h, s_idx_r, PHASE,
                  n, d, H, GROUP: tl.constexpr, LAYOUT_HEAD_STRIDE, qk_scale, scale,
                  IS_CAUSAL: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, DP: tl.constexpr,
                  SPARSE_BLOCK: tl.constexpr, USE_TMA: tl.constexpr, EVEN_N: tl.constexpr, ALIGN: tl.constexpr):
    """dK, dV of key tile ``pid`` of (batch ``b``, kv head ``hk``)."""
    start_n = pid * BLOCK_N1
    col = start_n // SPARSE_BLOCK
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    k = _tile(K, b, start_n, hk, n, skb, skn, skh, d, BLOCK_N1, DP, USE_TMA)
    v = _tile(V, b, start_n, hk, n, svb, svn, svh, d, BLOCK_N1, DP, USE_TMA)
    dk = tl.zeros([BLOCK_N1, DP], tl.float32)
    dv = tl.zeros([BLOCK_N1, DP], tl.float32)
    for g in tl.static_range(0, GROUP):
        hq = hk * GROUP + g
        bhq = b * H + hq
        lh = hq * LAYOUT_HEAD_STRIDE
        num = tl.load(Q_PART_NUM + lh * s_num_h + col)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, Q_PART_IDX + lh * s_idx_h + col * s_idx_r, num, 0,
                             b, hq, bhq, offs_n, n, d, qk_scale, sqb, sqn, sqh, sdb, sdn, sdh,
                             True, IS_CAUSAL, BLOCK_M1, DP, SPARSE_BLOCK, USE_TMA, EVEN_N)
        num = tl.load(Q_FULL_NUM + lh * s_num_h + col)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, Q_FULL_IDX + lh * s_idx_h + col * s_idx_r, num,
                             _first(PHASE, num, ALIGN),
                             b, hq, bhq, offs_n, n, d, qk_scale, sqb, sqn, sqh, sdb, sdn, sdh,
                             False, IS_CAUSAL, BLOCK_M1, DP, SPARSE_BLOCK, USE_TMA, EVEN_N)
    _store_tile(DK, dk * scale, b, start_n, hk, n, sdkb, sdkn, sdkh, d, BLOCK_N1, DP)
    _store_tile(DV, dv, b, start_n, hk, n, sdvb, sdvn, sdvh, d, BLOCK_N1, DP)
