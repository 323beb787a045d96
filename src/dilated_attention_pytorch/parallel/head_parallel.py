"""Head-parallel (all-to-all, DeepSpeed-Ulysses style) dilated attention over sequence shards.

Each rank passes its contiguous sequence shard ``(b, n_local, h, d)``. One all-to-all turns sequence
shards into head shards ``(b, n, h/P, d)``; every rank runs single-device
:func:`~dilated_attention_pytorch.dilated_attention` (``backend="auto"``) on the whole sequence for its
heads; one all-to-all turns the result back into sequence shards. Gradients flow through the
all-to-alls (the backward of one is the other). Each rank sends ``(P-1)/P`` of its q, k, v and output
shards per layer: bytes per rank do not grow with the number of ranks, they grow with ``n_local``.

Heads: ``h % P == 0`` is required. Key/value heads: with ``h_kv % P == 0`` each rank gets its own
``h_kv/P`` of them (grouped-query attention is kept); otherwise keys/values are repeated to ``h`` heads
before the all-to-all (exact, more bytes). Offsets and head groups are those of the global head index.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..backends import choose_backend
from ..functional import AttentionArgs, attend, attention_args
from ..improved import ImprovedDilatedAttention, ImprovedMultiheadDilatedAttention
from ..patterns import OffsetRule, head_groups_of, head_offsets
from .comm import DEFAULT_TIMEOUT_S, CommStats, agree_call, check_timeout, post, wait_transfers

__all__ = [
    "DistributedImprovedDilatedAttention",
    "DistributedImprovedMultiheadDilatedAttention",
    "head_parallel_dilated_attention",
]

_WHAT = "head_parallel_dilated_attention"


def _all_to_all(send: torch.Tensor, group: Any, timeout_s: float, what: str) -> torch.Tensor:
    """``recv[p] = send`` chunk of rank p for this rank, waiting at most ``timeout_s`` for the other ranks."""
    recv = torch.empty_like(send)
    transfer = f"the all-to-all of {what}"
    work = post(_WHAT, transfer, lambda: dist.all_to_all_single(recv, send, group=group, async_op=True))
    wait_transfers([(work, transfer)], _WHAT, timeout_s, send.device)
    return recv


def _seq_to_heads(x: torch.Tensor, group: Any, world: int, timeout_s: float, what: str) -> torch.Tensor:
    """(b, n_local, H, d) sequence shard -> (b, world·n_local, H/world, d) head shard."""
    b, n_local, h, d = x.shape
    send = x.reshape(b, n_local, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()  # (P, b, nl, hP, d)
    recv = _all_to_all(send, group, timeout_s, what)  # recv[p] = rank p's sequence shard of this rank's heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * n_local, h // world, d)


def _heads_to_seq(y: torch.Tensor, group: Any, world: int, timeout_s: float, what: str) -> torch.Tensor:
    """(b, world·n_local, H/world, d) head shard -> (b, n_local, H, d) sequence shard."""
    b, n, hp, d = y.shape
    send = y.reshape(b, world, n // world, hp, d).permute(1, 0, 2, 3, 4).contiguous()  # (P, b, nl, hP, d)
    recv = _all_to_all(send, group, timeout_s, what)  # recv[p] = this rank's sequence shard of rank p's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, n // world, world * hp, d)


class _AllToAll(torch.autograd.Function):
    """Sequence shards -> head shards (``to_heads``) or back; the backward is the other direction."""

    @staticmethod
    def forward(ctx, x, to_heads, group, world, stats, timeout_s, what):
        ctx.settings = (not to_heads, group, world, stats, timeout_s, f"gradient of {what} (backward)")
        _count(stats, x, world, forward=True)
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, world, timeout_s, f"{what} (forward)")

    @staticmethod
    def backward(ctx, grad):
        to_heads, group, world, stats, timeout_s, what = ctx.settings
        _count(stats, grad, world, forward=False)
        exchange = _seq_to_heads if to_heads else _heads_to_seq
        return exchange(grad.contiguous(), group, world, timeout_s, what), None, None, None, None, None, None


def _count(stats: Optional[CommStats], x: torch.Tensor, world: int, forward: bool) -> None:
    if stats is None:
        return
    sent = x.numel() * x.element_size() * (world - 1) // world  # the chunk for itself stays
    if forward:
        stats.forward_bytes_sent += sent
        stats.forward_bytes_received += sent
    else:
        stats.backward_bytes_sent += sent
        stats.backward_bytes_received += sent
    stats.messages_sent += world - 1


def _head_runs(h: int, world: int, rank: int, args: AttentionArgs) -> list[tuple[range, AttentionArgs]]:
    """This rank's heads as runs that one single-device call serves: (global heads, the call's settings
    for them: their patterns, with explicit offsets[i][j'] for the run's heads)."""
    local = range(rank * (h // world), (rank + 1) * (h // world))
    users = head_groups_of(h, len(args.segment_lengths), args.head_groups)
    per_pattern = [dict(zip(users[i], head_offsets(args.offsets, i, r, users[i])))
                   for i, r in enumerate(args.dilation_rates)]

    def run(heads: range, patterns: Sequence[int]) -> tuple[range, AttentionArgs]:
        return heads, dataclasses.replace(
            args, segment_lengths=tuple(args.segment_lengths[i] for i in patterns), head_groups=False,
            dilation_rates=tuple(args.dilation_rates[i] for i in patterns),
            offsets=tuple(tuple(per_pattern[i][j] for j in heads) for i in patterns),
        )

    if not args.head_groups:  # every head uses every pattern
        return [run(local, range(len(args.segment_lengths)))]
    runs = []  # head groups: each head uses exactly one pattern
    for i in range(len(args.segment_lengths)):
        heads = range(max(users[i].start, local.start), min(users[i].stop, local.stop))
        if len(heads):
            runs.append(run(heads, [i]))
    return runs


def head_parallel_dilated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_lengths: Sequence[int],
    dilation_rates: Sequence[int], *, process_group: Any = None, is_causal: bool = False,
    scale: Optional[float] = None, dropout_p: float = 0.0, offsets: OffsetRule = "paper", head_groups: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None, return_lse: bool = False, backend: str = "auto",
    stats: Optional[CommStats] = None, timeout_s: float = DEFAULT_TIMEOUT_S, check_timeout_s: Optional[float] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Shard in, shard out: this rank's ``(b, n_local, h, d)`` shard of the output of
    :func:`~dilated_attention_pytorch.dilated_attention` on the whole sequence (forward and gradients).

    Same arguments and contract as :func:`~dilated_attention_pytorch.parallel.ring_dilated_attention`
    (``timeout_s`` bounds the agreement check and, on the CPU, every all-to-all and all-gather, forward
    and backward; on a GPU those stay stream-ordered, bounded by the process group's own timeout);
    needs ``h % world == 0``. Dropout is supported (each rank draws its own heads' masks). ``backend`` is
    that of the single-device call on each rank's heads (default ``"auto"``: the fastest that applies).
    """
    def check(world: int) -> AttentionArgs:
        args = attention_args(
            query, key, value, segment_lengths, dilation_rates, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
            offsets=offsets, head_groups=head_groups, key_padding_mask=key_padding_mask, return_lse=return_lse,
            backend=backend,
        )
        if query.shape[2] % world != 0:
            raise ValueError(
                f"head-parallel attention needs the number of query heads to be a multiple of the world size, "
                f"but got heads={query.shape[2]} on world={world}; use ring_dilated_attention (RingDilatedAttention) "
                "or a process group whose size divides the heads"
            )
        return args

    call = agree_call(_WHAT, "head_parallel", process_group, query, key, check,
                      lambda a: {**vars(a), "key_padding_mask": key_padding_mask is not None}, timeout_s,
                      check_timeout_s, stats)
    args, group, rank, world, timeout_s = call.args, call.group, call.rank, call.world, call.timeout_s
    if stats is not None:
        stats.calls += 1
    b, n_local, h, d = query.shape
    h_kv = key.shape[2]
    if h_kv % world != 0:  # documented GQA scheme: repeat key/value heads to h (exact, more bytes)
        key = key.repeat_interleave(h // h_kv, dim=2)
        value = value.repeat_interleave(h // h_kv, dim=2)
        h_kv = h
    q_h = _AllToAll.apply(query, True, group, world, stats, timeout_s, "query shards")  # (b, n, h/P, d)
    k_h = _AllToAll.apply(key, True, group, world, stats, timeout_s, "key shards")  # (b, n, h_kv/P, d)
    v_h = _AllToAll.apply(value, True, group, world, stats, timeout_s, "value shards")
    mask = None
    if key_padding_mask is not None:
        mine = key_padding_mask.to(torch.uint8).contiguous()  # gloo has no bool collectives
        parts = [torch.empty_like(mine) for _ in range(world)]
        transfer = "the all-gather of key_padding_mask shards"
        work = post(_WHAT, transfer, lambda: dist.all_gather(parts, mine, group=group, async_op=True))
        wait_transfers([(work, transfer)], _WHAT, timeout_s, mine.device)
        mask = torch.cat(parts, 1).bool()  # (b, n)
    qpk = h // h_kv
    hp, kvp = h // world, h_kv // world
    # one choice of backend for every run (they share device, dtype, head_dim, mask and dropout)
    choice = choose_backend(args.backend, query, mask, args.dropout_p, args.return_lse and torch.is_grad_enabled())
    outs, lses = [], []
    for heads, run in _head_runs(h, world, rank, args):
        q_r = q_h[:, :, heads.start - rank * hp : heads.stop - rank * hp]
        kv_idx = [j // qpk - rank * kvp for j in heads]
        if heads.start % qpk == 0 and len(heads) % qpk == 0:  # whole key/value groups: keep GQA
            kv_sl = slice(kv_idx[0], kv_idx[-1] + 1)
            k_r, v_r = k_h[:, :, kv_sl], v_h[:, :, kv_sl]
        else:  # a run that cuts a key/value group: one key/value head per query head
            idx = torch.tensor(kv_idx, device=query.device)
            k_r, v_r = k_h.index_select(2, idx), v_h.index_select(2, idx)
        out_r, lse_r = attend(q_r, k_r, v_r, mask, run, choice)
        outs.append(out_r)
        lses.append(lse_r)
    out_h = torch.cat(outs, 2) if len(outs) > 1 else outs[0]  # (b, n, h/P, d)
    out = _AllToAll.apply(out_h, False, group, world, stats, timeout_s, "output heads")  # (b, n_local, h, d)
    if not args.return_lse:
        return out
    lse_h = torch.cat(lses, 1) if len(lses) > 1 else lses[0]  # (b, h/P, n)
    lse = _AllToAll.apply(lse_h.transpose(1, 2).unsqueeze(-1).contiguous(), False, group, world, None, timeout_s,
                          "LSE heads")
    return out, lse.squeeze(-1).transpose(1, 2)  # (b, h, n_local)


class DistributedImprovedDilatedAttention(ImprovedDilatedAttention):
    """Head-parallel :class:`ImprovedDilatedAttention` for multi-GPU / multi-node training: shard in,
    shard out. Each rank runs the fastest single-device path on its heads of the whole sequence.

    Arguments of :class:`BaseDilatedAttention`, and ``process_group`` and ``timeout_s``, which bounds
    every wait for other ranks. Needs ``num_heads % world == 0``; see
    :func:`head_parallel_dilated_attention`. ``.stats`` counts bytes.
    """

    def __init__(self, *args: Any, process_group: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_s = check_timeout(timeout_s)
        self.process_group = process_group
        self.stats = CommStats()

    def _attend(self, query, key, value, is_causal, key_padding_mask) -> torch.Tensor:
        c = self.config
        return head_parallel_dilated_attention(
            query, key, value, c.segment_lengths, c.dilation_rates, process_group=self.process_group,
            is_causal=is_causal, scale=c.softmax_scale, dropout_p=c.dropout if self.training else 0.0,
            offsets=c.offsets, head_groups=c.head_groups, key_padding_mask=key_padding_mask, backend=c.backend,
            stats=self.stats, timeout_s=self.timeout_s,
        )


class DistributedImprovedMultiheadDilatedAttention(ImprovedMultiheadDilatedAttention):
    """:class:`ImprovedMultiheadDilatedAttention` (fused q/k/v projection) whose core is
    :class:`DistributedImprovedDilatedAttention` (``process_group=``, ``timeout_s=`` go to it);
    ``to_multihead()`` gives the single-device equivalent.

    Input: this rank's shard ``(b, n_local, embed_dim)``; output: its shard of the result. ``timeout_s``
    bounds every wait for other ranks.
    """

    attention_class = DistributedImprovedDilatedAttention

    @property
    def stats(self) -> CommStats:
        return self.attention.stats
