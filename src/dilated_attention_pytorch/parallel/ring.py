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
from ..executor import Exchange, Gather, Group, Program, Task, execute
from ..functional import AttentionArgs, attend, attention_args
from ..kernels import BlockInputs, BlockKernel, choose_kernel
from ..multihead import BaseMultiheadDilatedAttention
from ..patterns import OffsetRule
from ..planning import pieces
from ..views import Rows, Whole
from .comm import DEFAULT_TIMEOUT_S, Agreed, CommStats, agree_call, check_timeout, exchange, wait_transfers
from .ring_plan import RingPlan, ring_plan
from .ring_wire import pack, wire

__all__ = ["RingDilatedAttention", "RingMultiheadDilatedAttention", "ring_dilated_attention"]

_WHAT = "ring_dilated_attention"
_BACKENDS = ("auto", "fused", "portable")  # not "reference": it builds n x n scores
FORWARD_ROWS = "key/value rows (forward)"  # what a ring exchange's transfers carry
BACKWARD_GRADS = "key/value gradients (backward)"


@dataclass(frozen=True, eq=False)
class _RingExchange:
    """The executor's exchange for a ring call: the dilated key/value rows of segments that cross shard
    boundaries, laid out per remote call on arrival (:mod:`.ring_wire`)."""

    plan: RingPlan
    group: Any
    stats: Optional[CommStats]
    timeout_s: float  # bound on every wait for other ranks

    def _transfer(self, sends: list, recvs: list, transfer: str) -> list:
        """Post ``(peer, buffer)`` sends and receives; -> the works to wait on."""
        return exchange(sends, recvs, self.group, _WHAT, transfer)

    def _wait(self, works: list, device: torch.device) -> None:
        wait_transfers(works, _WHAT, self.timeout_s, device)

    def _count(self, sends: list, recvs: list, forward: bool) -> None:
        if self.stats is None:
            return
        sent = sum(buf.numel() * buf.element_size() for _, buf in sends)
        received = sum(buf.numel() * buf.element_size() for _, buf in recvs)
        if forward:
            self.stats.calls += 1
            self.stats.forward_bytes_sent += sent
            self.stats.forward_bytes_received += received
        else:
            self.stats.backward_bytes_sent += sent
            self.stats.backward_bytes_received += received
        self.stats.messages_sent += len(sends)

    def post(self, k, v, key_valid):
        plan = self.plan
        w = wire(plan, k.shape[0], k.shape[2], k.shape[-1], key_valid is not None, k.device)
        sends = list(zip([p for p, _ in plan.sends], pack(plan, k, v, key_valid).split(w.send_sizes)))
        recv = k.new_empty(sum(w.recv_sizes))
        recvs = list(zip([p for p, _ in plan.recvs], recv.split(w.recv_sizes)))
        works = self._transfer(sends, recvs, FORWARD_ROWS)
        self._count(sends, recvs, True)
        return works, recv, w, (k, v, key_valid)

    def wait(self, pending):
        works, recv, w, (k, v, key_valid) = pending
        b, d = k.shape[0], k.shape[-1]
        self._wait(works, k.device)
        shapes = w.call_shapes
        own_sizes, sizes = [b * h * m for h, m, _ in shapes], [b * h * n for h, _, n in shapes]
        rows = recv.view(-1, d)
        spaces = []
        for x, x_rows, idx in ((k, rows, w.call_k), (v, rows, w.call_v)):
            own = x.reshape(-1, d).index_select(0, w.own_rows).split(own_sizes)
            got = x_rows.index_select(0, idx).split(sizes)
            # per call its own rows (with_own), then the received rows: (b, H, L_own + L, d)
            spaces.append([torch.cat([o.view(b, h, m, d), g.view(b, h, n, d)], 2) if m else g.view(b, h, n, d)
                           for o, g, (h, m, n) in zip(own, got, shapes)])
        masks: list = [None] * len(shapes)
        if w.call_mask is not None:
            own = key_valid.reshape(-1).index_select(0, w.own_mask).split([b * m for _, m, _ in shapes])
            got = (recv.index_select(0, w.call_mask) > 0.5).split([b * n for _, _, n in shapes])
            masks = [torch.cat([o.view(b, m), g.view(b, n)], 1) for o, g, (_, m, n) in zip(own, got, shapes)]
        return list(zip(spaces[0], spaces[1], masks))

    def post_grads(self, grads, like):
        plan, d = self.plan, like.shape[-1]
        w = wire(plan, like.shape[0], like.shape[2], d, False, like.device)
        acc = torch.zeros(w.grad_recv_rows, d, dtype=grads[0][0].dtype if grads else torch.float32,
                          device=like.device)
        own = [[g[:, :, :m].reshape(-1, d) for (g, _), (_, m, _) in zip(grads, w.call_shapes)],
               [g[:, :, :m].reshape(-1, d) for (_, g), (_, m, _) in zip(grads, w.call_shapes)]]
        grads = [(gk[:, :, m:], gv[:, :, m:]) for (gk, gv), (_, m, _) in zip(grads, w.call_shapes)]
        if grads:  # every call's key and value gradients, summed into the rows they came in
            acc.index_add_(0, torch.cat([w.grad_k, w.grad_v]),
                           torch.cat([g.reshape(-1, d) for g, _ in grads] + [g.reshape(-1, d) for _, g in grads]))
        sends = list(zip([p for p, _ in plan.recvs], acc.to(like.dtype).split(w.grad_recv_split)))
        sends = [(p, buf.reshape(-1)) for p, buf in sends]
        recv = like.new_empty(sum(w.grad_send_split), d)
        recvs = [(p, buf.reshape(-1)) for p, buf in zip([p for p, _ in plan.sends], recv.split(w.grad_send_split))]
        works = self._transfer(sends, recvs, BACKWARD_GRADS)
        self._count(sends, recvs, False)
        return works, recv, w, [torch.cat(x) if x else None for x in own]

    def finish_grads(self, pending, dk, dv):
        works, recv, w, own = pending
        for target, rows in zip((dk, dv), own):  # the calls' own rows: this rank's keys
            if rows is not None and rows.numel():
                _add_rows(target, w.own_rows, rows)
        self._wait(works, dk.device)
        if not recv.numel():
            return
        for target, pos in ((dk, w.grad_send_kpos), (dv, w.grad_send_vpos)):
            _add_rows(target, w.send_rows, recv.index_select(0, pos))


def _add_rows(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``target.view(-1, d)[index] += rows`` (repeated indices add up), for any strides of ``target``."""
    rows = rows.to(target.dtype)
    if target.is_contiguous():
        target.view(-1, target.shape[-1]).index_add_(0, index, rows)
    else:
        flat = torch.zeros(target.numel() // target.shape[-1], target.shape[-1], dtype=target.dtype,
                           device=target.device)
        target.add_(flat.index_add_(0, index, rows).view(target.shape))


def ring_program(plan: RingPlan, exchange_: Exchange, kernel: BlockKernel, remote_kernel: BlockKernel,
                 is_causal: bool, scale: float, fused: bool = False, batch: int = 1) -> Program:
    """The executor program of one rank's margins (or of the whole shard when the plan has no core): own
    blocks (square, the single-device kernel), then each remote call: its query rows against the rows
    received through ``exchange_`` (queries and keys of different lengths: ``remote_kernel``). ``fused``:
    merged by the Triton gather kernel, gradients summed in the input dtype, own blocks' backward cut in
    pieces as the engine does (needs a plan without core)."""
    h = plan.num_heads
    limit = max(1 << 17, batch * plan.n_local * h // 8) if fused else 1 << 62
    tasks = []
    for bl in plan.own_blocks:
        parts = pieces(batch, bl.span.count, bl.span.rows, len(bl.head_list(h)), limit)
        tasks.append(Task(Rows(bl, bl.heads), Rows(bl, bl.kv_heads), kernel, is_causal,
                          pieces=tuple((Rows(bl, bl.heads, p), Rows(bl, bl.kv_heads, p)) for p in parts)))
    tasks += [Task(Rows(call.q_rows, call.q_rows.heads), Whole(), remote_kernel, False, space=i + 1)
              for i, call in enumerate(plan.remote_calls)]
    gather = None
    if fused:
        if plan.core[1] > plan.core[0]:
            raise ValueError("a fused ring program needs a plan without core (ring_plan(..., with_core=False))")
        k = len(plan.patterns)
        lo, n = plan.rank * plan.n_local, plan.n_total
        phases = tuple(lo % w for w, _ in plan.patterns)
        full = tuple(max(0, (min(lo + plan.n_local, n // w * w) - -(-lo // w) * w) // w) for w, _ in plan.patterns)
        # a second table row for each pattern with received rows: their partial results, for the same rows
        second = sorted({c.slot[0] for c in plan.remote_calls if not c.with_own})
        rows = list(range(k)) + second
        slots = plan.own_slots + tuple(c.slot if c.with_own else (k + second.index(c.slot[0]), c.slot[1], c.slot[2])
                                       for c in plan.remote_calls)
        gather = Gather(tuple(plan.patterns[i][0] for i in rows), tuple(plan.patterns[i][1] for i in rows),
                        tuple(phases[i] for i in rows), tuple(full[i] for i in rows), slots)
    return Program((Group(tuple(tasks), gather=gather),), scale, grads_in_input_dtype=fused, exchange=exchange_)


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
                     args.offsets, args.head_groups, args.is_causal, with_core=choice.backend != "fused",
                     diagonal_blocks=key_padding_mask is None)
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
    lse (b, h, n_local) if ``args.return_lse`` else None). On the fused path the plan has no core
    (``with_core=False``): one program over the whole shard, merged by the Triton gather kernel.
    ``benchmarks/ring_rank_bench.py`` times it with an in-process exchange."""
    key_valid = None if key_padding_mask is None else ~key_padding_mask
    remote_kernel = choose_kernel(_inputs(query, key_valid, False))  # queries and keys of different lengths
    program = ring_program(plan, exchange_, choice.kernel, remote_kernel, args.is_causal, args.scale,
                           fused=choice.backend == "fused", batch=query.shape[0])
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
