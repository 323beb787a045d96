"""``BlockSparseRingDistributedDilatedAttention``: block-sparse attention over a sequence sharded across
the ranks of a process group, fetching only the key/value blocks each rank's layout needs.

Every rank builds the same global layout (builders are deterministic), so every rank knows which of its
key/value blocks each other rank needs without asking. One ``all_to_all_single`` moves exactly those
blocks (keys and values together); the backward sends their gradients back the same way and adds them
where they came from. Attention then runs on the portable path over the local queries and the compact
set of fetched key blocks, with the layout's columns renumbered to that set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import _validation as V
from ..block_sparse.cache import METADATA_CACHE, layout_digest, tensor_bytes
from ..block_sparse.modules import BlockSparseRingDilatedAttention
from ..block_sparse.plan import BlockPlan, build_plan
from ..block_sparse.portable import portable_block_sparse_attention
from .comm import DEFAULT_TIMEOUT_S, agree_call, check_timeout, post, wait_transfers

__all__ = ["BlockSparseRingDistributedDilatedAttention"]

_WHAT = "BlockSparseRingDistributedDilatedAttention"


@dataclass(frozen=True)
class _Exchange:
    """Which local blocks go to each rank, how many come from each, and the compact plan."""

    send: tuple[torch.Tensor, ...]  # per destination rank: local block indices to send (empty for self)
    recv_counts: tuple[int, ...]  # per source rank: blocks received (0 for self)
    own: torch.Tensor  # local block indices this rank needs from itself
    needed: torch.Tensor  # global indices of every key block this rank needs, ascending
    plan: BlockPlan
    fetched_blocks: int  # blocks received from other ranks


def _needed_blocks(layout: torch.Tensor, rank: int, local_blocks: int, is_causal: bool) -> torch.Tensor:
    """Global key blocks that the query blocks of ``rank`` use, ascending. ``layout (H, nb, nb)``."""
    q0 = rank * local_blocks
    rows = layout[:, q0 : q0 + local_blocks].any(0)  # (m, nb)
    if is_causal:
        qg = torch.arange(q0, q0 + local_blocks, device=layout.device)[:, None]
        rows = rows & (torch.arange(layout.shape[-1], device=layout.device)[None, :] <= qg)
    return rows.any(0).nonzero().flatten()


def _build_exchange(
    layout: torch.Tensor, rank: int, world: int, local_blocks: int, seq_len: int, block_size: int, is_causal: bool,
    num_heads: int,
) -> _Exchange:
    m = local_blocks
    needs = [_needed_blocks(layout, r, m, is_causal) for r in range(world)]
    owner = lambda g: g // m  # noqa: E731
    send = tuple(
        torch.empty(0, dtype=torch.long, device=layout.device) if dst == rank
        else needs[dst][owner(needs[dst]) == rank] - rank * m
        for dst in range(world)
    )
    mine = needs[rank]
    recv_counts = tuple(0 if src == rank else int((owner(mine) == src).sum()) for src in range(world))
    own = mine[owner(mine) == rank] - rank * m
    q_global = torch.arange(rank * m, (rank + 1) * m, device=layout.device)
    compact = layout.expand(num_heads, -1, -1)[:, rank * m : (rank + 1) * m][:, :, mine]  # (H, m, N)
    plan = build_plan(compact, q_global, mine, seq_len, block_size, is_causal)
    return _Exchange(send, recv_counts, own, mine, plan, sum(recv_counts))


def _all_to_all(recv: torch.Tensor, send: torch.Tensor, recv_counts, send_counts, group: Any, timeout_s: float,
                what: str) -> None:
    work = post(_WHAT, what, lambda: dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group,
                                                             async_op=True))
    wait_transfers([(work, what)], _WHAT, timeout_s, send.device)


class _FetchBlocks(torch.autograd.Function):
    """(m, E) local blocks -> (N, E) the needed blocks in ascending global order; backward sends the
    gradients of fetched blocks back to their owners and sums them into the local blocks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ex: _Exchange, rank: int, group: Any, timeout_s: float) -> torch.Tensor:
        send_buf = torch.cat([x[idx] for idx in ex.send], 0)
        recv_buf = x.new_empty(sum(ex.recv_counts), x.shape[1])
        _all_to_all(recv_buf, send_buf, [int(c) for c in ex.recv_counts], [int(s.numel()) for s in ex.send], group,
                    timeout_s, "the all-to-all of key/value blocks (forward)")
        parts = list(recv_buf.split(list(ex.recv_counts)))
        parts[rank] = x[ex.own]  # sources in rank order = ascending global blocks
        ctx.ex, ctx.rank, ctx.group, ctx.local_blocks, ctx.timeout_s = ex, rank, group, x.shape[0], timeout_s
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ex: _Exchange = ctx.ex
        sizes = [ex.own.numel() if src == ctx.rank else c for src, c in enumerate(ex.recv_counts)]
        parts = list(grad.contiguous().split(sizes))
        own_grad = parts[ctx.rank]
        parts[ctx.rank] = grad.new_empty(0, grad.shape[1])
        send_back = torch.cat(parts, 0).contiguous()
        recv_back = grad.new_empty(sum(s.numel() for s in ex.send), grad.shape[1])
        _all_to_all(recv_back, send_back, [int(s.numel()) for s in ex.send], [int(c) for c in ex.recv_counts],
                    ctx.group, ctx.timeout_s, "the all-to-all of key/value block gradients (backward)")
        dx = grad.new_zeros(ctx.local_blocks, grad.shape[1])
        dx.index_add_(0, ex.own, own_grad)
        dx.index_add_(0, torch.cat(ex.send, 0), recv_back)
        return dx, None, None, None, None


class BlockSparseRingDistributedDilatedAttention(BlockSparseRingDilatedAttention):
    """Sequence-sharded block-sparse attention: each rank passes its contiguous shard ``(b, n/P, ...)``
    (rank order = sequence order, equal shards, each a multiple of ``block_size``) and gets its shard of
    the output, equal to :func:`block_sparse_attention` on the whole sequence. Only the key/value blocks
    the rank's rows of the layout use travel (``last_fetched_blocks`` says how many came in).

    Every rank must call it with the same shapes and settings; otherwise (or if another rank called
    another sequence-parallel strategy, or passed invalid inputs) every rank raises a ``ValueError``
    naming the differing values per rank. ``timeout_s`` (seconds) bounds that check and every later
    wait for other ranks' blocks or gradients: a rank that fails or stops taking part makes the others
    raise a ``RuntimeError`` within it instead of hanging (on a GPU the waits after the check stay
    stream-ordered and the process group's own timeout bounds them)."""

    def __init__(self, *args: Any, process_group: Optional[Any] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 **kwargs: Any) -> None:
        super().__init__(*args, backend="portable", **kwargs)
        if self.sparse_config.content_dependent:
            raise ValueError(
                "pattern='adaptive' is not supported sequence-sharded (its layout needs every rank's "
                "pooled queries and keys); use a fixed pattern"
            )
        self.timeout_s = check_timeout(timeout_s)
        self.process_group = process_group
        self.last_fetched_blocks = 0

    def _attend(self, query, key, value, is_causal, key_padding_mask) -> torch.Tensor:
        def check(world: int) -> bool:
            if key_padding_mask is not None:
                raise ValueError(
                    "key_padding_mask is not supported by block-sparse attention; mask blocks in the layout"
                )
            V.check_qkv(query, key, value)
            if query.shape[1] % self.block_size != 0:
                raise ValueError(
                    f"each rank's shard length must be a multiple of block_size={self.block_size}, but got "
                    f"{query.shape[1]}"
                )
            return V.check_bool("is_causal", is_causal)

        c = self.config
        call = agree_call(_WHAT, "block_sparse", self.process_group, query, key, check, lambda causal: dict(
            is_causal=causal, block_size=self.block_size, softmax_scale=c.softmax_scale,
            segment_lengths=c.segment_lengths, dilation_rates=c.dilation_rates, offsets=c.offsets,
            head_groups=c.head_groups, sparse_config=self.sparse_config,
        ), self.timeout_s)
        group, rank, world, is_causal = call.group, call.rank, call.world, call.args
        b, n_local, h, d = query.shape
        bs = self.block_size
        n = n_local * world
        layout = self.layout(n, h, query.device, is_causal=is_causal)
        m = n_local // bs
        key_ = ("exchange", layout_digest(layout), tuple(layout.shape), rank, world, n, bs, is_causal, h,
                str(query.device))
        ex = METADATA_CACHE.get_or_create(
            key_, lambda: _build_exchange(layout, rank, world, m, n, bs, is_causal, h), tensor_bytes
        )
        self.last_fetched_blocks = ex.fetched_blocks
        h_kv = key.shape[2]
        kv = torch.stack([key, value])  # (2, b, n_local, h_kv, d)
        kv = kv.unflatten(2, (m, bs)).permute(2, 0, 1, 3, 4, 5).reshape(m, -1)  # (m, 2*b*bs*h_kv*d)
        fetched = _FetchBlocks.apply(kv, ex, rank, group, self.timeout_s)  # (N, E)
        count = fetched.shape[0]
        fetched = fetched.view(count, 2, b, bs, h_kv, d).permute(1, 2, 0, 3, 4, 5).reshape(2, b, count * bs, h_kv, d)
        out, _ = portable_block_sparse_attention(
            query, fetched[0], fetched[1], ex.plan, scale=self.config.softmax_scale or d**-0.5, lse_needs_grad=False
        )
        return out
