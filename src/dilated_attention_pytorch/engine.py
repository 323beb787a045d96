"""The block engine behind every single-device backend.

Per pattern and offset, the rows a head covers are a strided view of the input (no gather copy); a
block kernel runs dense attention on each block and returns its log-sum-exp; blocks are merged by
log-sum-exp in fp32 (LongNet Eq. 10), each weighted relative to the row's largest block LSE
(:mod:`.merge`). Backward is exact through the mixing: each block's attention backward runs with the
*merged* output, the way ring attention does, so its share of the gradient is that of
``softmax(scale·QKᵀ + log C)·V``. In float32/float64 it runs with the row's largest block LSE and the
incoming gradient divided by the row's sum of weights (:func:`.merge.backward_stats`), so that the
rounding of the merged LSE (``ulp(lse)``, large at large logits) reaches no gradient. In float16/bfloat16
(the fused GPU path) it runs with the merged LSE: there the scaled incoming gradient would be rounded to
the input dtype, an error (2^-8 in bfloat16, 2^-11 in float16) above the merged LSE's (``|lse|·2^-24``)
below ``|lse| = 2^16`` and ``2^13``, and the scaling would cost a pass over the gradient on the hot path.

The sequence is processed in chunks whose boundaries are boundaries of every pattern's segments, so
fp32 temporaries are bounded by the chunk, not by ``n``; memory is O(n·w) with no n×n matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional, Sequence, Union

import torch

from .kernels import BlockInputs, BlockKernel, acc_dtype, has_key, host_checks
from .lru import LRUCache
from .merge import backward_stats, lse_shift
from .patterns import OffsetRule, RowSpan, pattern_groups, row_spans

__all__ = ["Block", "EngineOptions", "chunk_bounds", "plan_blocks", "run_engine"]

HeadIndex = Union[slice, tuple[int, ...]]


@dataclass(frozen=True)
class Block:
    """One kernel call: the rows of one offset of one pattern, for a set of query heads.

    A *diagonal* block (``diag_m`` set) instead covers every offset ``o`` of a pattern at once, for the
    heads ``j = o + r·diag_m`` (the ``"paper"`` rule gives head ``j`` the offset ``j mod r``): row
    offset and head advance together, which is again a strided view. It replaces ``r`` small calls by
    one call of ``r`` heads when ``h / r < r``.
    """

    span: RowSpan
    offset: int  # -1 for a diagonal block
    dilation: int
    heads: HeadIndex  # query heads, in the kernel's head order
    kv_heads: HeadIndex  # the key/value head of each query head (may repeat under GQA)
    pattern: int = -1
    diag_m: Optional[int] = None

    key: tuple = field(init=False, repr=False, compare=False)  # hashable (a slice is not before Python 3.12)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.span, self.offset, self.dilation, _index_key(self.heads),
                                         _index_key(self.kv_heads), self.pattern, self.diag_m))

    def head_list(self, num_heads: int) -> list[int]:
        if isinstance(self.heads, slice):
            return list(range(num_heads))[self.heads]
        return list(self.heads)

    def head_offset(self, position: int) -> int:
        """Offset of the block's ``position``-th head."""
        return position if self.diag_m is not None else self.offset


def _index_key(index: HeadIndex) -> tuple:
    return (index.start, index.stop, index.step) if isinstance(index, slice) else ("at",) + tuple(index)


class _ViewMemo:
    """What a chain of view ops does to tensors of one shape and stride, remembered so that later calls
    make the same view with one ``as_strided``.

    At short sequences the chains (narrow, unflatten, slice, diagonal, transpose: about ten ops per
    tensor and block) cost more host time than the kernels they feed. A chain whose result is a copy
    (an ``index_select``, a ``contiguous``) is remembered as such and runs every time. A bounded,
    thread-safe LRU (:class:`~dilated_attention_pytorch.lru.LRUCache`); entries are a few integers.
    """

    def __init__(self, maxsize: int = 1 << 14) -> None:
        self._specs: LRUCache = LRUCache(maxsize)

    def __call__(self, x: torch.Tensor, key: tuple, build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced once into the graph: nothing to save
            return build(x)
        built: list[torch.Tensor] = []

        def make() -> Optional[tuple]:
            y = build(x)
            built.append(y)
            if y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() or y.numel() == 0:
                return None  # a copy: nothing to remember but that
            return y.shape, y.stride(), y.storage_offset() - x.storage_offset()

        spec = self._specs.get_or_create((key, x.shape, x.stride()), make)
        if built:
            return built[0]
        if spec is None:
            return build(x)
        return x.as_strided(spec[0], spec[1], x.storage_offset() + spec[2])


_views = _ViewMemo()


def _as_index(heads: Sequence[int]) -> HeadIndex:
    """A slice when ``heads`` is an arithmetic progression without repeats (a view, no copy)."""
    if len(heads) == 1:
        return slice(heads[0], heads[0] + 1)
    step = heads[1] - heads[0]
    if step > 0 and all(b - a == step for a, b in zip(heads, heads[1:])):
        return slice(heads[0], heads[-1] + 1, step)
    return tuple(heads)


@lru_cache(maxsize=256)
def plan_blocks(
    n: int,
    num_heads: int,
    num_kv_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    offsets: OffsetRule,
    head_groups: bool,
    diagonal_blocks: bool = False,
) -> tuple[Block, ...]:
    """The kernel calls for ``n`` tokens. ``segment_lengths`` must already be the effective ``W_i``.
    ``diagonal_blocks`` allows diagonal blocks (not with key masks, whose rows would differ by head)."""
    group = num_heads // num_kv_heads
    groups = pattern_groups(n, num_heads, segment_lengths, dilation_rates, offsets, head_groups)
    blocks = []
    for i, (seg, r) in enumerate(zip(segment_lengths, dilation_rates)):
        mine = [pg for pg in groups if pg.pattern == i]
        diagonal = _diagonal_spans(n, num_heads, group, seg, r, mine) if diagonal_blocks else []
        for span in diagonal:
            for m in range(num_heads // r):
                heads = slice(r * m, r * m + r)  # heads o + r*m, in the order of their offsets o
                blocks.append(Block(span, -1, r, heads, heads, i, m))
        done = {span.start for span in diagonal}
        for pg in mine:
            heads, kv = _as_index(pg.heads), _as_index([j // group for j in pg.heads])
            for span in row_spans(n, pg.segment, pg.dilation, pg.offset):
                if span.start not in done:
                    blocks.append(Block(span, pg.offset, pg.dilation, heads, kv, i))
    return tuple(blocks)


def _diagonal_spans(n: int, num_heads: int, group: int, seg: int, r: int, mine) -> list[RowSpan]:
    """Spans of pattern ``(seg, r)`` that run as diagonal blocks: the heads' offsets are ``j mod r``
    for all heads, ``r`` divides ``h`` and the span's segment, keys are not shared (no GQA), and
    diagonal blocks are fewer than per-offset blocks (``h / r < r``)."""
    if r == 1 or group != 1 or num_heads % r or num_heads // r >= r:
        return []
    if sorted(j for pg in mine for j in pg.heads) != list(range(num_heads)):
        return []
    if any(j % r != pg.offset for pg in mine for j in pg.heads):
        return []
    spans, full = [], n // seg
    if full and seg % r == 0:
        spans.append(RowSpan(0, full, seg, seg // r))
    tail = n - full * seg
    if tail and tail % r == 0:
        spans.append(RowSpan(full * seg, 1, tail, tail // r))
    return spans


def chunk_bounds(n: int, segments: Sequence[int], target_tokens: int) -> list[tuple[int, int]]:
    """Chunks ``[c0, c1)`` whose boundaries are segment boundaries of every pattern.

    A chunk holds a multiple of ``lcm(W_i)`` tokens, about ``target_tokens`` (one chunk when the lcm
    is not much smaller than ``n``).
    """
    period = 1
    for w in segments:
        period = period * w // math.gcd(period, w)
        if period >= n:
            return [(0, n)]
    size = period * max(1, target_tokens // period)
    return [(c0, min(n, c0 + size)) for c0 in range(0, n, size)]


def _rows(x: torch.Tensor, block: Block) -> torch.Tensor:
    """View (b, count, rows, ...) of the block's rows of ``x (b, n, ...)``; no copy."""
    span = block.span
    seg = x.narrow(1, span.start, span.count * span.segment).unflatten(1, (span.count, span.segment))
    return seg[:, :, block.offset :: block.dilation]


@lru_cache(maxsize=1024)
def _index_tensor(index: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Head indices on the device, made once (a host-to-device copy would stall the queue)."""
    return torch.tensor(index, device=device)


def _heads(x: torch.Tensor, index: HeadIndex) -> torch.Tensor:
    """Select heads (dim 3) of a (b, count, rows, H, ...) tensor: a view for a slice, else a copy."""
    if isinstance(index, slice):
        return x[:, :, :, index]
    return x.index_select(3, _index_tensor(index, x.device))


def _add_heads(target: torch.Tensor, index: HeadIndex, src: torch.Tensor) -> None:
    """target[:, :, :, index] += src, summing repeated indices."""
    if isinstance(index, slice):
        target[:, :, :, index] += src
    else:
        target.index_add_(3, _index_tensor(index, target.device), src.to(target.dtype))


def _view(x: torch.Tensor, block: Block, heads: HeadIndex) -> torch.Tensor:
    """(b, count, rows, H', ...) view or copy of the block's rows and heads of ``x (b, n, h, ...)``."""
    if block.diag_m is None:
        return _heads(_rows(x, block), heads)
    span, r = block.span, block.dilation
    seg = x.narrow(1, span.start, span.count * span.segment).unflatten(1, (span.count, span.rows, r))
    seg = seg.unflatten(4, (x.shape[2] // r, r)).select(4, block.diag_m)  # (b, count, rows, r_o, r_h, ...)
    return seg.diagonal(dim1=3, dim2=4).movedim(-1, 3)  # (b, count, rows, r, ...): head o has offset o


def _write_view(target: torch.Tensor, block: Block, heads: HeadIndex, src: torch.Tensor) -> None:
    """The block's rows and heads of ``target`` = ``src``."""
    if block.diag_m is None and not isinstance(heads, slice):
        _rows(target, block).index_copy_(3, _index_tensor(heads, target.device), src)
    else:
        _view(target, block, heads).copy_(src)


def _add_view(target: torch.Tensor, block: Block, src: torch.Tensor) -> None:
    """The block's rows and heads of ``target`` += ``src``."""
    if block.diag_m is None and not isinstance(block.heads, slice):
        _rows(target, block).index_add_(3, _index_tensor(block.heads, target.device), src.to(target.dtype))
    else:
        _view(target, block, block.heads).add_(src)


def _add_view_weighted(target: torch.Tensor, block: Block, src: torch.Tensor, weight: torch.Tensor) -> None:
    """The block's rows and heads of ``target (fp32/fp64)`` += ``src * weight[..., None]``."""
    if block.diag_m is None and not isinstance(block.heads, slice):
        index = _index_tensor(block.heads, target.device)
        _rows(target, block).index_add_(3, index, src.to(target.dtype) * weight.unsqueeze(-1))
    else:
        _view(target, block, block.heads).addcmul_(src, weight.unsqueeze(-1))


def _to_kernel(x5: torch.Tensor) -> torch.Tensor:
    """(b, count, rows, H, D) -> (b*count, H, rows, D), a view where the strides allow."""
    b, s, c, h, d = x5.shape
    x = x5.reshape(b * s, c, h, d).transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()  # fused kernels need unit stride in head_dim


def _from_kernel(x: torch.Tensor, b: int) -> torch.Tensor:
    """(b*count, H, rows, ...) -> (b, count, rows, H, ...)."""
    x = x.transpose(1, 2)
    return x.reshape(b, x.shape[0] // b, *x.shape[1:])


def _block_tensor(x: torch.Tensor, block: Block, heads: HeadIndex) -> torch.Tensor:
    return _views(x, ("block", block.key, _index_key(heads)), lambda t: _to_kernel(_view(t, block, heads)))


def _piece_tensor(x: torch.Tensor, block: Block, heads: HeadIndex, piece: tuple[int, int, int, int]) -> torch.Tensor:
    """Kernel layout of one piece ``(c0, c1, h0, h1)`` (segments, heads) of the block's rows of ``x``."""
    c0, c1, h0, h1 = piece
    return _views(x, ("piece", block.key, _index_key(heads), piece),
                  lambda t: _to_kernel(_view(t, block, heads)[:, c0:c1, :, h0:h1]))


def _block_rowwise(x: torch.Tensor, block: Block) -> torch.Tensor:
    """(b, n, h) per-row values -> (B, H, rows) for the block."""
    return _block_tensor(x.unsqueeze(-1), block, block.heads).squeeze(-1)


@dataclass
class EngineOptions:
    segment_lengths: tuple[int, ...]  # effective W_i = min(w_i, n)
    dilation_rates: tuple[int, ...]
    offsets: OffsetRule
    head_groups: bool
    is_causal: bool
    scale: float
    dropout_p: float
    kernel: BlockKernel
    chunk_tokens: int
    merge: str = "torch"  # "torch": two-phase merge in PyTorch ops; "triton": one gather kernel per chunk
    grads_in_input_dtype: bool = False  # accumulate dq/dk/dv over patterns in the input dtype (no fp32 copy)
    piece_token_heads: int = 1 << 62  # backward: kernel calls cover at most about this many token-heads
    rng_states: dict = field(default_factory=dict)  # (chunk, block) -> the kernel's random state


def _chunks(b: int, n: int, opts: EngineOptions):
    """(batch rows, c0, c1, effective segments) of each chunk. A chunk of part of the sequence is run
    one batch entry at a time: with several, its segments are not evenly spaced in memory (the batch
    stride spans the whole sequence), and every block's rows would be copied instead of viewed."""
    bounds = chunk_bounds(n, opts.segment_lengths, opts.chunk_tokens)
    rows = [slice(0, b)] if b == 1 or len(bounds) == 1 else [slice(i, i + 1) for i in range(b)]
    for bs in rows:
        for c0, c1 in bounds:
            yield bs, c0, c1, tuple(min(w, c1 - c0) for w in opts.segment_lengths)


def _forward_chunk(q, k, v, key_valid, opts: EngineOptions, segments, chunk: int, out_target, lse_target,
                   stats_target) -> None:
    """Attention of one chunk, written into ``out_target (b, m, h, d)`` and ``lse_target (b, m, h)``, and
    the merge's ``(shift, total)`` into ``stats_target`` when given (see :mod:`.merge`)."""
    b, m, h, d = q.shape
    acc = acc_dtype(q.dtype)
    blocks = plan_blocks(m, h, k.shape[2], segments, opts.dilation_rates, opts.offsets, opts.head_groups,
                         diagonal_blocks=key_valid is None)
    lse_max = torch.full((b, m, h), float("-inf"), dtype=acc, device=q.device) if opts.merge == "torch" else None
    results = []
    for bi, block in enumerate(blocks):  # phase 1: every block's attention, and each row's largest LSE
        kv_rows = None if key_valid is None else _rows(key_valid, block).reshape(-1, block.span.rows)
        out_b, lse_b, rng = opts.kernel.forward(
            _block_tensor(q, block, block.heads), _block_tensor(k, block, block.kv_heads),
            _block_tensor(v, block, block.kv_heads),
            key_valid=kv_rows, is_causal=opts.is_causal, scale=opts.scale, dropout_p=opts.dropout_p,
            padding_finite=True,
        )
        opts.rng_states[chunk, bi] = rng
        lse_b = lse_b.to(acc)
        if kv_rows is not None:  # rows whose keys are all padded: no keys, whatever the kernel said
            lse_b = lse_b.masked_fill(~has_key(kv_rows, opts.is_causal)[:, None, :], float("-inf"))
        if opts.merge == "torch":  # torch.maximum propagates NaN: a NaN row stays NaN
            lse_view = _view(lse_max.unsqueeze(-1), block, block.heads).squeeze(-1)
            _write_view(lse_max.unsqueeze(-1), block, block.heads,
                        torch.maximum(lse_view, _from_kernel(lse_b, b)).unsqueeze(-1))
        results.append((block, out_b, lse_b))
    if opts.merge == "triton":
        from .kernels.triton_gather import gather_blocks

        gather_blocks(out_target, lse_target, blocks, [r[1] for r in results], [r[2] for r in results],
                      num_heads=h, segments=tuple(segments), dilations=tuple(opts.dilation_rates),
                      stats_target=stats_target)
        return
    shift = lse_shift(lse_max)
    out = torch.zeros(b, m, h, d, dtype=acc, device=q.device)
    total = torch.zeros(b, m, h, 1, dtype=acc, device=q.device)
    for block, out_b, lse_b in results:  # phase 2: out = sum_i w_i out_i / sum_i w_i, w_i = exp(lse_i - max)
        weight = torch.exp(lse_b - _block_rowwise(shift, block))  # (B, H, rows)
        _add_view_weighted(out, block, _from_kernel(out_b, b), _from_kernel(weight, b))
        _add_view(total, block, _from_kernel(weight.unsqueeze(-1), b))
    torch.div(out, total.masked_fill(total == 0, 1.0), out=out_target)  # no keys: 0 / 1
    total = total.squeeze(-1)
    lse_target.copy_(shift + torch.log(total))  # log(0) = -inf: no keys
    if stats_target is not None:
        stats_target[0].copy_(shift)
        stats_target[1].copy_(total)


def _backward_chunk(dout, q, k, v, out, lse, stats, key_valid, dlse, opts: EngineOptions, segments, chunk: int,
                    kernel, targets) -> None:
    """Gradients of one chunk, written into ``targets = (dq, dk, dv)`` views. ``stats``: the merge's
    ``(shift, total)`` for the exact backward (see the module docstring), or None (the merged LSE)."""
    b, m, h, d = q.shape
    acc = acc_dtype(q.dtype)
    blocks = plan_blocks(m, h, k.shape[2], segments, opts.dilation_rates, opts.offsets, opts.head_groups,
                         diagonal_blocks=key_valid is None)
    if opts.grads_in_input_dtype:  # accumulate straight into the gradients
        dq, dk, dv = targets
    else:
        dq, dk, dv = (torch.empty(t.shape, dtype=acc, device=q.device) for t in (q, k, v))
    # A pattern of dilation 1 gives every row to every head once: its gradients are written, not added,
    # so it runs first and the tensors it writes need no zeroing (one pass less over each).
    cover = _covering_pattern(blocks, m, h)
    order = sorted(range(len(blocks)), key=lambda bi: blocks[bi].pattern != cover)
    writes = tuple(cover is not None and all(_all_heads(getattr(bl, role), n) for bl in blocks if bl.pattern == cover)
                   for role, n in (("heads", h), ("kv_heads", k.shape[2]), ("kv_heads", k.shape[2])))
    for target, write in zip((dq, dk, dv), writes):
        if not write:
            target.zero_()
    no_keys = lse == float("-inf")  # NaN rows are not "no keys": their NaN reaches their gradients
    delta = None
    if dlse is not None:  # d lse / d s = P: fold it into delta = rowsum(dO * O) - dlse
        delta = (dout.to(acc) * out.to(acc)).sum(-1) - dlse.masked_fill(no_keys, 0.0)
    if stats is None:
        lse_bwd = lse.masked_fill(no_keys, float("inf"))  # rows with no keys: P = 0
    else:
        lse_bwd, dout, delta = backward_stats(*stats, dout, delta)
    lse_bwd4, delta4 = lse_bwd.unsqueeze(-1), None if delta is None else delta.unsqueeze(-1)
    for bi in order:
        block = blocks[bi]
        rng = opts.rng_states[chunk, bi]
        hq, hkv = block.heads, block.kv_heads
        first = block.pattern == cover
        # Pieces of the block bound the temporaries (a piece's gradients and the kernel's workspace);
        # a random stream belongs to the whole block, so blocks with dropout are not cut.
        whole = opts.dropout_p > 0
        heads = len(block.head_list(h))
        for piece in _pieces(b, block.span.count, block.span.rows, heads, opts.piece_token_heads, whole):
            c0, c1 = piece[:2]
            kv_rows = None if key_valid is None else _rows(key_valid, block)[:, c0:c1].reshape(-1, block.span.rows)
            dq_b, dk_b, dv_b = kernel.backward(
                _piece_tensor(dout, block, hq, piece), _piece_tensor(q, block, hq, piece),
                _piece_tensor(k, block, hkv, piece), _piece_tensor(v, block, hkv, piece),
                _piece_tensor(out, block, hq, piece), _piece_tensor(lse_bwd4, block, hq, piece).squeeze(-1), rng,
                key_valid=kv_rows, is_causal=opts.is_causal, scale=opts.scale, dropout_p=opts.dropout_p,
                delta=None if delta4 is None else _piece_tensor(delta4, block, hq, piece).squeeze(-1),
                padding_finite=True,
            )
            for target, index, grad, write in zip((dq, dk, dv), (hq, hkv, hkv), (dq_b, dk_b, dv_b), writes):
                _add_piece(target, block, index, piece, _from_kernel(grad, b), write=first and write)
    if not opts.grads_in_input_dtype:
        for target, grad in zip(targets, (dq, dk, dv)):
            target.copy_(grad)


def _pieces(b: int, count: int, rows: int, heads: int, limit: int, whole: bool):
    """(c0, c1, h0, h1) ranges of segments and heads with about ``limit`` token-heads each."""
    if whole or b * count * rows * heads <= limit:
        return [(0, count, 0, heads)]
    hh = heads if b * rows * heads <= limit else max(1, limit // (b * rows))
    cc = max(1, limit // (b * rows * hh))
    return [(c0, min(count, c0 + cc), h0, min(heads, h0 + hh)) for c0 in range(0, count, cc) for h0 in range(0, heads, hh)]


def _covering_pattern(blocks: Sequence[Block], m: int, num_heads: int) -> Optional[int]:
    """A pattern of dilation 1 whose blocks cover each of the ``m`` rows once, for all query heads in
    order (a slice), or None."""
    for i in sorted({bl.pattern for bl in blocks}):
        mine = [bl for bl in blocks if bl.pattern == i]
        if all(bl.dilation == 1 and bl.diag_m is None and _all_heads(bl.heads, num_heads) for bl in mine) and \
                sum(bl.span.count * bl.span.segment for bl in mine) == m:
            return i
    return None


def _all_heads(index: HeadIndex, num_heads: int) -> bool:
    return isinstance(index, slice) and range(num_heads)[index] == range(num_heads)


def _add_piece(target: torch.Tensor, block: Block, index: HeadIndex, piece, src: torch.Tensor, write: bool = False) -> None:
    """The piece's rows and heads of ``target`` += ``src (b, c1-c0, rows, h1-h0, ...)`` (``write``: =)."""
    c0, c1, h0, h1 = piece
    if block.diag_m is not None or isinstance(index, slice):
        view = _views(target, ("add", block.key, _index_key(index), piece),
                      lambda t: _view(t, block, index)[:, c0:c1, :, h0:h1])
        view.copy_(src) if write else view.add_(src)
    else:
        _rows(target, block)[:, c0:c1].index_add_(3, _index_tensor(index[h0:h1], target.device), src.to(target.dtype))


class _EngineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, opts: EngineOptions):
        b, n, h, d = q.shape
        acc = acc_dtype(q.dtype)
        if key_valid is not None and not (host_checks(k) and _finite_padding(key_valid, k, v)):
            # padded keys and values that may hold NaN or inf: zeros (once here, not once per block)
            k, v = (x.masked_fill(~key_valid[:, :, None, None], 0.0) for x in (k, v))
        out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, n, h, dtype=acc, device=q.device)
        # the merge's (shift, total) for the exact backward: float32/float64 inputs and several patterns
        # (one pattern: shift = lse, total = 1); see the module docstring
        exact = q.dtype == acc and len(opts.segment_lengths) > 1
        stats = (torch.empty_like(lse), torch.empty_like(lse)) if exact else None
        for ci, (bs, c0, c1, segments) in enumerate(_chunks(b, n, opts)):
            kv_c = None if key_valid is None else key_valid[bs, c0:c1]
            _forward_chunk(q[bs, c0:c1], k[bs, c0:c1], v[bs, c0:c1], kv_c, opts, segments, ci,
                           out[bs, c0:c1], lse[bs, c0:c1], None if stats is None else [t[bs, c0:c1] for t in stats])
        ctx.save_for_backward(q, k, v, key_valid, out, lse, *(stats or (None, None)))
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, key_valid, out, lse, shift, total = ctx.saved_tensors
        opts: EngineOptions = ctx.opts
        kernel = opts.kernel
        if dlse is not None and kernel.not_supported_reasons(_inputs(q, key_valid, opts.dropout_p, True)):
            from .kernels import choose_kernel  # a kernel whose backward takes delta

            kernel = choose_kernel(_inputs(q, key_valid, opts.dropout_p, True))
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # each chunk writes all of its rows
        for ci, (bs, c0, c1, segments) in enumerate(_chunks(q.shape[0], q.shape[1], opts)):
            sl = slice(c0, c1)
            _backward_chunk(
                dout[bs, sl], q[bs, sl], k[bs, sl], v[bs, sl], out[bs, sl], lse[bs, sl],
                None if shift is None else (shift[bs, sl], total[bs, sl]),
                None if key_valid is None else key_valid[bs, sl], None if dlse is None else dlse[bs, sl],
                opts, segments, ci, kernel, (dq[bs, sl], dk[bs, sl], dv[bs, sl]),
            )
        if key_valid is not None:  # padded keys and values: exactly zero, even where a NaN in the real
            padded = ~key_valid[:, :, None, None]  # inputs reached them in a block as 0 * NaN
            dk.masked_fill_(padded, 0.0)
            dv.masked_fill_(padded, 0.0)
        return dq, dk, dv, None, None


def _finite_padding(key_valid: torch.Tensor, *xs: torch.Tensor) -> bool:
    """Whether the padded rows of ``xs (b, n, ...)`` hold only finite values (a host sync; only those
    rows are copied)."""
    padded = ~key_valid
    return not bool(padded.any()) or all(bool(torch.isfinite(x[padded]).all()) for x in xs)


def _inputs(q: torch.Tensor, key_valid: Optional[torch.Tensor], dropout_p: float, needs_delta: bool) -> BlockInputs:
    return BlockInputs(
        device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], has_key_mask=key_valid is not None,
        dropout=dropout_p > 0, needs_delta=needs_delta,
    )


def run_engine(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_valid: Optional[torch.Tensor],
    opts: EngineOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (b, n, h, d), lse (b, n, h) in float32/float64)."""
    return _EngineFunction.apply(query, key, value, key_valid, opts)
