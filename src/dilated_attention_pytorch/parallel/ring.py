"""Sequence-parallel dilated attention (LongNet §3.1): each rank holds a contiguous shard of the sequence.

When no segment of any pattern crosses a shard boundary, each rank runs single-device
:func:`~dilated_attention_pytorch.dilated_attention` on its shard: no communication at all. Otherwise
the rows of the shard tiled by whole segments of every pattern (the *core*) still run single-device,
and the rest (the margins) runs here: a segment that crosses a shard boundary moves only its dilated
key/value rows, only among the ranks it touches (:mod:`.ring_plan`); the transfers are posted first and
overlap with the local blocks. Partial results merge by log-sum-exp in fp32
(:mod:`~dilated_attention_pytorch.executor`); backward runs each block's kernel backward
with the merged output and LSE (as the single-device engine does) and returns the key/value gradients
of received rows to their owners.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from ..attention import BaseDilatedAttention
from ..backends import choose_backend
from ..executor import Exchange, Group, Program, Task, execute
from ..functional import AttentionArgs, attend, attention_args
from ..kernels import BlockInputs, BlockKernel, choose_kernel
from ..multihead import BaseMultiheadDilatedAttention
from ..patterns import OffsetRule
from ..views import HeadSelect, Rows, index_tensor, rows
from .comm import DEFAULT_TIMEOUT_S, Agreed, CommStats, agree_call, check_timeout, exchange, wait_transfers
from .ring_plan import RingPlan, ring_plan

__all__ = ["RingDilatedAttention", "RingMultiheadDilatedAttention", "ring_dilated_attention"]

_WHAT = "ring_dilated_attention"
_BACKENDS = ("auto", "fused", "portable")  # not "reference": it builds n x n scores
FORWARD_ROWS = "key/value rows (forward)"  # what a ring exchange's transfers carry
BACKWARD_GRADS = "key/value gradients (backward)"


def _pack_kv(k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor], transfers) -> torch.Tensor:
    """One flat buffer of the rows ``transfers`` send: keys, values (and key masks as 0/1)."""
    parts = []
    for t in transfers:
        idx = index_tensor(t.kv_heads, k.device)
        parts.append(rows(k, t.src_rows)[:, 0].index_select(2, idx).reshape(-1))  # (b, rows, U, d)
        parts.append(rows(v, t.src_rows)[:, 0].index_select(2, idx).reshape(-1))
        if key_valid is not None:
            parts.append(rows(key_valid, t.src_rows)[:, 0].reshape(-1).to(k.dtype))  # (b, rows)
    return torch.cat(parts)


def _unpack_kv(buf: torch.Tensor, transfers, b: int, d: int, with_mask: bool) -> list[tuple]:
    out, pos = [], 0
    for t in transfers:
        size = b * t.rows * len(t.kv_heads) * d
        k = buf[pos : pos + size].view(b, t.rows, len(t.kv_heads), d)
        v = buf[pos + size : pos + 2 * size].view(b, t.rows, len(t.kv_heads), d)
        pos += 2 * size
        kv = None
        if with_mask:
            kv = buf[pos : pos + b * t.rows].view(b, t.rows) > 0.5
            pos += b * t.rows
        out.append((k, v, kv))
    return out


def _kv_buffer_size(transfers, b: int, d: int, with_mask: bool) -> int:
    return sum(b * t.rows * (2 * len(t.kv_heads) * d + (1 if with_mask else 0)) for t in transfers)


def _cat(parts: list) -> Optional[torch.Tensor]:
    return None if parts[0] is None else (torch.cat(parts, 1) if len(parts) > 1 else parts[0])


@dataclass(frozen=True, eq=False)
class _RingExchange:
    """The executor's exchange for a ring call: the dilated key/value rows of segments that cross shard
    boundaries, one received key space per remote call (its transfers' rows concatenated)."""

    plan: RingPlan
    group: Any
    stats: Optional[CommStats]
    timeout_s: float  # bound on every wait for other ranks

    def _transfer(self, sends: list, recvs: list, transfer: str) -> list:
        """Post ``(peer, buffer)`` sends and receives; -> the works to wait on."""
        return exchange(sends, recvs, self.group, _WHAT, transfer)

    def _wait(self, works: list, device: torch.device) -> None:
        wait_transfers(works, _WHAT, self.timeout_s, device)

    def post(self, k, v, key_valid):
        plan, b, d = self.plan, k.shape[0], k.shape[-1]
        with_mask = key_valid is not None
        sends = [(p, _pack_kv(k, v, key_valid, ts)) for p, ts in plan.sends]
        recvs = [(p, k.new_empty(_kv_buffer_size(ts, b, d, with_mask))) for p, ts in plan.recvs]
        works = self._transfer(sends, recvs, FORWARD_ROWS)
        if self.stats is not None:
            self.stats.calls += 1
            self.stats.forward_bytes_sent += sum(buf.numel() * buf.element_size() for _, buf in sends)
            self.stats.forward_bytes_received += sum(buf.numel() * buf.element_size() for _, buf in recvs)
            self.stats.messages_sent += len(sends)
        return works, recvs, b, d, with_mask, k.device

    def wait(self, pending):
        works, recvs, b, d, with_mask, device = pending
        self._wait(works, device)
        received = [x for (_, buf), (_, ts) in zip(recvs, self.plan.recvs) for x in _unpack_kv(buf, ts, b, d, with_mask)]
        return [tuple(_cat([received[i][part] for i in call.transfers]) for part in range(3))
                for call in self.plan.remote_calls]

    def post_grads(self, grads, like):
        plan, flat = self.plan, self.plan.recv_transfers
        grads_of: list = [None] * len(flat)
        for call, (gk, gv) in zip(plan.remote_calls, grads):
            pos = 0
            for i in call.transfers:
                grads_of[i] = (gk[:, pos : pos + flat[i].rows], gv[:, pos : pos + flat[i].rows])
                pos += flat[i].rows
        sends, i = [], 0
        for peer, ts in plan.recvs:  # gradients go back to the ranks the rows came from
            parts = []
            for _ in ts:
                parts += [g.to(like.dtype).reshape(-1) for g in grads_of[i]]
                i += 1
            sends.append((peer, torch.cat(parts)))
        b, d = like.shape[0], like.shape[-1]
        recvs = [(p, like.new_empty(_kv_buffer_size(ts, b, d, False))) for p, ts in plan.sends]
        works = self._transfer(sends, recvs, BACKWARD_GRADS)
        if self.stats is not None:
            self.stats.backward_bytes_sent += sum(buf.numel() * buf.element_size() for _, buf in sends)
            self.stats.backward_bytes_received += sum(buf.numel() * buf.element_size() for _, buf in recvs)
            self.stats.messages_sent += len(sends)
        return works, recvs

    def finish_grads(self, pending, dk, dv):
        works, recvs = pending
        b, d = dk.shape[0], dk.shape[-1]
        self._wait(works, dk.device)
        for (_, buf), (_, ts) in zip(recvs, self.plan.sends):
            for t, (gk, gv, _) in zip(ts, _unpack_kv(buf, ts, b, d, False)):
                idx = index_tensor(t.kv_heads, dk.device)
                rows(dk, t.src_rows)[:, 0].index_add_(2, idx, gk.to(dk.dtype))
                rows(dv, t.src_rows)[:, 0].index_add_(2, idx, gv.to(dv.dtype))


def ring_program(plan: RingPlan, exchange_: Exchange, kernel: BlockKernel, remote_kernel: BlockKernel,
                 is_causal: bool, scale: float) -> Program:
    """The executor program of one rank's margins: own blocks (square, the single-device kernel), then
    each remote call: its query rows against the rows received through ``exchange_`` (queries and keys of
    different lengths: ``remote_kernel``)."""
    tasks = [Task(Rows(bl, bl.heads), Rows(bl, bl.kv_heads), kernel, is_causal) for bl in plan.own_blocks]
    tasks += [Task(Rows(call.q_rows, call.q_rows.heads), HeadSelect(call.kv_select), remote_kernel, False, space=i + 1)
              for i, call in enumerate(plan.remote_calls)]
    return Program((Group(tuple(tasks)),), scale, exchange=exchange_)


def _inputs(q: torch.Tensor, key_valid, needs_delta: bool) -> BlockInputs:
    return BlockInputs(
        device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], has_key_mask=key_valid is not None,
        dropout=False, needs_delta=needs_delta,
    )


def _agree(query, key, value, segment_lengths, dilation_rates, process_group, is_causal, scale, dropout_p, offsets,
           head_groups, key_padding_mask, return_lse, backend, stats, timeout_s, check_timeout_s) -> Agreed:
    """Check this rank's call and agree on it with every rank of the group (raises on every rank if any
    rank's inputs are invalid or differ, or if another rank called another strategy)."""
    def check(world: int) -> AttentionArgs:
        args = attention_args(
            query, key, value, segment_lengths, dilation_rates, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
            offsets=offsets, head_groups=head_groups, key_padding_mask=key_padding_mask, return_lse=return_lse,
            backend=backend, backends=_BACKENDS,
        )
        if args.dropout_p > 0:
            raise ValueError(
                f"dropout_p must be 0 for ring_dilated_attention (attention dropout is not supported across ranks), "
                f"but got {args.dropout_p}; use DistributedImprovedDilatedAttention for dropout"
            )
        return args

    return agree_call(_WHAT, "ring", process_group, query, key, check,
                      lambda a: {**vars(a), "key_padding_mask": key_padding_mask is not None}, timeout_s,
                      check_timeout_s, stats, stacklevel=5)  # user -> ring -> _agree -> agree_call -> warning


def ring_dilated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_lengths: Sequence[int],
    dilation_rates: Sequence[int], *, process_group: Any = None, is_causal: bool = False,
    scale: Optional[float] = None, dropout_p: float = 0.0, offsets: OffsetRule = "paper", head_groups: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None, return_lse: bool = False, backend: str = "auto",
    stats: Optional[CommStats] = None, timeout_s: float = DEFAULT_TIMEOUT_S, check_timeout_s: Optional[float] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Dilated attention over a sequence split across the ranks of ``process_group``.

    Each rank passes its contiguous shard ``query (b, n_local, h, d)``, ``key``/``value
    (b, n_local, h_kv, d)`` (rank ``p`` holds positions ``[p·n_local, (p+1)·n_local)``; every rank the same
    ``n_local``) and gets its shard of the output of :func:`~dilated_attention_pytorch.dilated_attention` on
    the whole sequence of ``world·n_local`` tokens — forward and gradients. ``key_padding_mask`` is this
    rank's shard ``(b, n_local)``. ``return_lse=True`` also returns the shard's LSE ``(b, h, n_local)``.

    Every rank must call this with the same settings (forward and backward); a rank with a different
    shard shape or setting, or one that called another sequence-parallel strategy, makes every rank raise
    a ``ValueError`` naming the differing values per rank (after one small all-gather). ``timeout_s``
    (seconds, default 300) bounds that check and every later wait for other ranks' rows or gradients: a
    rank that never arrives, or fails or stops after the check, makes the others raise a ``RuntimeError``
    within ``timeout_s`` instead of hanging. On a GPU (NCCL) the waits after the check stay stream-ordered
    (a bounded host wait would stall the GPU) and the process group's own timeout bounds them.
    ``check_timeout_s`` is the deprecated former name of ``timeout_s``. ``stats``, a :class:`CommStats`,
    accumulates the bytes this rank sends and receives. Dropout is not supported. ``backend``
    (``"auto"``, ``"fused"``, ``"portable"``) chooses the block kernel as on one device.
    """
    call = _agree(query, key, value, segment_lengths, dilation_rates, process_group, is_causal, scale, dropout_p,
                  offsets, head_groups, key_padding_mask, return_lse, backend, stats, timeout_s, check_timeout_s)
    args = call.args
    b, n_local, h, d = query.shape
    # One choice of backend and block kernel for the whole call: the core and a local-only call run it,
    # and the own blocks use its block kernel.
    choice = choose_backend(args.backend, query, key_padding_mask, 0.0, args.return_lse and torch.is_grad_enabled())
    plan = ring_plan(call.world, call.rank, n_local, h, key.shape[2], args.segment_lengths, args.dilation_rates,
                     args.offsets, args.head_groups, args.is_causal)
    if plan.local_only:
        # Every segment lies inside one shard: the single-device path on the shard is exact (§3.1).
        if stats is not None:
            stats.calls += 1
            stats.local_only_calls += 1
        out, lse = attend(query, key, value, key_padding_mask, args, choice)
        return (out, lse) if args.return_lse else out
    out, lse = ring_shard(query, key, value, key_padding_mask, args, choice, plan,
                          _RingExchange(plan, call.group, stats, call.timeout_s))
    return (out, lse) if args.return_lse else out


def ring_shard(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
               args: AttentionArgs, choice: Any, plan: RingPlan,
               exchange_: Exchange) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One rank's work of a ring call whose segments cross shard boundaries: ``plan``'s program on the
    executor (received rows through ``exchange_``), and single-device attention on the core. -> (out,
    lse (b, h, n_local) if ``args.return_lse`` else None). ``benchmarks/ring_rank_bench.py`` times it
    with an in-process exchange."""
    key_valid = None if key_padding_mask is None else ~key_padding_mask
    remote_kernel = choose_kernel(_inputs(query, key_valid, False))  # queries and keys of different lengths
    program = ring_program(plan, exchange_, choice.kernel, remote_kernel, args.is_causal, args.scale)
    out, lse_bnh = execute(program, query, key, value, key_valid)  # (b, n_local, h, d), (b, n_local, h)
    lse = lse_bnh.transpose(1, 2)  # (b, h, n_local)
    c0, c1 = plan.core
    if c1 > c0:
        # Rows tiled by whole segments of every pattern: single-device attention on them is exact, and the
        # ring function left them untouched (zeros); splice the core in.
        sl = slice(c0, c1)
        out_core, lse_core = attend(query[:, sl], key[:, sl], value[:, sl],
                                    None if key_padding_mask is None else key_padding_mask[:, sl], args, choice)
        out = torch.cat([out[:, :c0], out_core, out[:, c1:]], 1)
        if args.return_lse:
            lse = torch.cat([lse[:, :, :c0], lse_core, lse[:, :, c1:]], 2)
    return out, lse if args.return_lse else None


class RingDilatedAttention(BaseDilatedAttention):
    """:class:`DilatedAttention` over a sequence sharded across ``process_group`` (shard in, shard out).

    Arguments of :class:`BaseDilatedAttention`, and ``process_group`` and ``timeout_s``, which bounds
    every wait for other ranks (see :func:`ring_dilated_attention`). ``.stats`` (a :class:`CommStats`)
    counts the bytes this rank sends. Attention dropout is not supported (construct with
    ``attention_dropout=0``); ``backend`` must not be ``"reference"``.
    """

    def __init__(self, *args: Any, process_group: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_s = check_timeout(timeout_s)
        if self.config.dropout > 0:
            raise ValueError(
                f"attention_dropout must be 0 for RingDilatedAttention (dropout is not supported across ranks), "
                f"but got {self.config.dropout}; use DistributedImprovedDilatedAttention for dropout"
            )
        if self.config.backend == "reference":
            raise ValueError("backend must not be 'reference' for RingDilatedAttention (it builds n×n scores)")
        self.process_group = process_group
        self.stats = CommStats()

    def _attend(self, query, key, value, is_causal, key_padding_mask) -> torch.Tensor:
        c = self.config
        return ring_dilated_attention(
            query, key, value, c.segment_lengths, c.dilation_rates, process_group=self.process_group,
            is_causal=is_causal, scale=c.softmax_scale, offsets=c.offsets, head_groups=c.head_groups,
            key_padding_mask=key_padding_mask, backend=c.backend, stats=self.stats, timeout_s=self.timeout_s,
        )


class RingMultiheadDilatedAttention(BaseMultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` whose attention core is :class:`RingDilatedAttention`
    (``process_group=``, ``timeout_s=`` go to it).

    Input: this rank's shard ``(b, n_local, embed_dim)``; output: its shard of the result. ``timeout_s``
    bounds every wait for other ranks (see :func:`ring_dilated_attention`).
    """

    attention_class = RingDilatedAttention

    @property
    def stats(self) -> CommStats:
        return self.attention.stats
