"""Sequence-parallel dilated attention (LongNet §3.1): each rank holds a contiguous shard of the sequence.

When no segment of any pattern crosses a shard boundary, each rank runs single-device
:func:`~dilated_attention_pytorch.dilated_attention` on its shard: no communication at all. Otherwise
the rows of the shard tiled by whole segments of every pattern (the *core*) still run single-device,
and the rest (the margins) runs here: a segment that crosses a shard boundary moves only its dilated
key/value rows, only among the ranks it touches (:mod:`.ring_plan`); the transfers are posted first and
overlap with the local blocks. Partial results merge by log-sum-exp in fp32
(:func:`~dilated_attention_pytorch.merge.merge_partials`); backward runs each block's kernel backward
with the merged output and LSE (as the single-device engine does) and returns the key/value gradients
of received rows to their owners.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from ..attention import BaseDilatedAttention
from ..backends import choose_backend
from ..engine import Block, _add_heads, _from_kernel, _heads, _rows, _to_kernel
from ..functional import AttentionArgs, attend, attention_args
from ..kernels import BlockInputs, BlockKernel, acc_dtype, choose_kernel
from ..merge import merge_partials
from ..multihead import BaseMultiheadDilatedAttention
from ..patterns import OffsetRule
from .comm import DEFAULT_TIMEOUT_S, Agreed, CommStats, agree_call, check_timeout, exchange, wait_transfers
from .ring_plan import RingPlan, ring_plan

__all__ = ["RingDilatedAttention", "RingMultiheadDilatedAttention", "ring_dilated_attention"]

_WHAT = "ring_dilated_attention"
_BACKENDS = ("auto", "fused", "portable")  # not "reference": it builds n x n scores


@dataclass
class _Args:
    plan: RingPlan
    group: Any
    is_causal: bool
    scale: float
    kernel: BlockKernel  # own blocks (square): the kernel the single-device path would pick
    remote_kernel: BlockKernel  # remote blocks (queries and keys of different lengths): a portable kernel
    stats: Optional[CommStats]
    timeout_s: float  # bound on every wait for other ranks


def _q_rows(x: torch.Tensor, block: Block) -> torch.Tensor:
    """(b, n, H, ...) -> kernel layout (b*count, Hb, rows, ...) of the block's query heads."""
    return _to_kernel(_heads(_rows(x, block), block.heads))


def _pack_kv(k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor], transfers) -> torch.Tensor:
    """One flat buffer of the rows ``transfers`` send: keys, values (and key masks as 0/1)."""
    parts = []
    for t in transfers:
        idx = torch.tensor(t.kv_heads, device=k.device)
        parts.append(_rows(k, t.src_rows)[:, 0].index_select(2, idx).reshape(-1))  # (b, rows, U, d)
        parts.append(_rows(v, t.src_rows)[:, 0].index_select(2, idx).reshape(-1))
        if key_valid is not None:
            parts.append(_rows(key_valid, t.src_rows)[:, 0].reshape(-1).to(k.dtype))  # (b, rows)
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


def _remote_inputs(call, received) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Keys/values of a remote call, concatenated over its transfers: (b, L, U, d) and mask (b, L)."""
    ks = [received[i][0] for i in call.transfers]
    vs = [received[i][1] for i in call.transfers]
    kvs = [received[i][2] for i in call.transfers]
    k = torch.cat(ks, 1) if len(ks) > 1 else ks[0]
    v = torch.cat(vs, 1) if len(vs) > 1 else vs[0]
    kv = None if kvs[0] is None else (torch.cat(kvs, 1) if len(kvs) > 1 else kvs[0])
    return k, v, kv


def _expand_heads(x: torch.Tensor, kv_select: tuple[int, ...]) -> torch.Tensor:
    """(b, L, U, d) -> kernel layout (b, Hb, L, d) with each query head's key/value head."""
    return x.index_select(2, torch.tensor(kv_select, device=x.device)).transpose(1, 2)


def _merge_into(out_acc, lse_acc, block: Block, out_b, lse_b, b: int) -> None:
    """Merge a block's partial (kernel layout) into the accumulators at the block's rows and heads."""
    out_view, lse_view = _rows(out_acc, block), _rows(lse_acc, block)
    idx = block.heads if isinstance(block.heads, slice) else list(block.heads)
    merged_out, merged_lse = merge_partials(
        out_view[:, :, :, idx], lse_view[:, :, :, idx], _from_kernel(out_b, b), _from_kernel(lse_b, b)
    )
    out_view[:, :, :, idx] = merged_out
    lse_view[:, :, :, idx] = merged_lse


def _mask_no_keys(out_b, lse_b, kv_rows, is_causal):
    if kv_rows is None:
        return out_b, lse_b
    # (B, 1, Lq) for a causal (square) block, (B, 1, 1) otherwise: whether each query row sees a key
    has_key = (kv_rows.cumsum(-1) > 0 if is_causal else kv_rows.any(-1, keepdim=True))[:, None, :]
    return out_b.masked_fill(~has_key[..., None], 0.0), lse_b.masked_fill(~has_key, float("-inf"))


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, args: _Args):
        plan, b, d = args.plan, q.shape[0], q.shape[-1]
        acc = acc_dtype(q.dtype)
        with_mask = key_valid is not None
        # 1. Post the transfers of dilated key/value rows; they overlap with the local blocks.
        sends = [(p, _pack_kv(k, v, key_valid, ts)) for p, ts in plan.sends]
        recvs = [(p, q.new_empty(_kv_buffer_size(ts, b, d, with_mask))) for p, ts in plan.recvs]
        works = exchange(sends, recvs, args.group, _WHAT, "key/value rows (forward)")
        # 2. Local blocks: this rank's queries against its own keys.
        out_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        rng_own, rng_remote = [], []
        for block in plan.own_blocks:
            kv_rows = None if key_valid is None else _rows(key_valid, block).reshape(-1, block.span.rows)
            out_b, lse_b, rng = args.kernel.forward(
                _q_rows(q, block), _to_kernel(_heads(_rows(k, block), block.kv_heads)),
                _to_kernel(_heads(_rows(v, block), block.kv_heads)),
                key_valid=kv_rows, is_causal=args.is_causal, scale=args.scale, dropout_p=0.0,
            )
            rng_own.append(rng)
            out_b, lse_b = _mask_no_keys(out_b.to(acc), lse_b.to(acc), kv_rows, args.is_causal)
            _merge_into(out_acc, lse_acc, block, out_b, lse_b, b)
        # 3. Remote blocks: queries of spanning segments against the rows other ranks sent.
        wait_transfers(works, _WHAT, args.timeout_s, q.device)
        received = [x for (_, buf), (_, ts) in zip(recvs, plan.recvs) for x in _unpack_kv(buf, ts, b, d, with_mask)]
        remote = []
        for call in plan.remote_calls:
            rk, rv, rkv = _remote_inputs(call, received)
            remote.append((rk, rv, rkv))
            out_b, lse_b, rng = args.remote_kernel.forward(
                _q_rows(q, call.q_rows), _expand_heads(rk, call.kv_select), _expand_heads(rv, call.kv_select),
                key_valid=rkv, is_causal=False, scale=args.scale, dropout_p=0.0,
            )
            rng_remote.append(rng)
            out_b, lse_b = _mask_no_keys(out_b.to(acc), lse_b.to(acc), rkv, False)
            _merge_into(out_acc, lse_acc, call.q_rows, out_b, lse_b, b)
        if args.stats is not None:
            sent = sum(buf.numel() * buf.element_size() for _, buf in sends)
            args.stats.calls += 1
            args.stats.forward_bytes_sent += sent
            args.stats.forward_bytes_received += sum(buf.numel() * buf.element_size() for _, buf in recvs)
            args.stats.messages_sent += len(sends)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, key_valid, out, lse_acc)
        ctx.args, ctx.remote, ctx.rng_own, ctx.rng_remote = args, remote, rng_own, rng_remote
        ctx.set_materialize_grads(False)
        return out, lse_acc

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, key_valid, out, lse_acc = ctx.saved_tensors
        args: _Args = ctx.args
        plan, b, d = args.plan, q.shape[0], q.shape[-1]
        acc = acc_dtype(q.dtype)
        if dout is None:
            dout = torch.zeros_like(out)
        own_kernel, remote_kernel = args.kernel, args.remote_kernel
        delta_full = None
        no_keys = lse_acc == float("-inf")  # a NaN LSE is not "no keys": it propagates
        if dlse is not None:  # d lse / d s = P: fold it into delta = rowsum(dO * O) - dlse
            delta_full = (dout.to(acc) * out.to(acc)).sum(-1) - dlse.masked_fill(no_keys, 0.0)
            # No dropout, so any kernel may run a block's backward: one that takes delta.
            own_kernel = remote_kernel = choose_kernel(_inputs(q, key_valid, True))
        lse_bwd = lse_acc.masked_fill(no_keys, float("inf"))  # no keys: P = 0
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)

        def run(kernel, forward_kernel, block: Block, kk, vv, kv_rows, is_causal, rng):
            delta = None if delta_full is None else _q_rows(delta_full.unsqueeze(-1), block).squeeze(-1)
            dq_b, dk_b, dv_b = kernel.backward(
                _q_rows(dout, block), _q_rows(q, block), kk, vv, _q_rows(out, block),
                _q_rows(lse_bwd.unsqueeze(-1), block).squeeze(-1), rng if kernel is forward_kernel else None,
                key_valid=kv_rows, is_causal=is_causal, scale=args.scale, dropout_p=0.0, delta=delta,
            )
            _add_heads(_rows(dq, block), block.heads, _from_kernel(dq_b, b).to(acc))
            return dk_b, dv_b

        # 1. Remote blocks first, so their key/value gradients travel while the local blocks run.
        flat = plan.recv_transfers
        grads_of: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(flat)
        for call, (rk, rv, rkv), rng in zip(plan.remote_calls, ctx.remote, ctx.rng_remote):
            kk, vv = _expand_heads(rk, call.kv_select), _expand_heads(rv, call.kv_select)
            dk_b, dv_b = run(remote_kernel, args.remote_kernel, call.q_rows, kk, vv, rkv, False, rng)
            sel = torch.tensor(call.kv_select, device=q.device)
            dk_u = torch.zeros(rk.shape, dtype=acc, device=q.device).index_add_(2, sel, dk_b.transpose(1, 2).to(acc))
            dv_u = torch.zeros(rv.shape, dtype=acc, device=q.device).index_add_(2, sel, dv_b.transpose(1, 2).to(acc))
            pos = 0
            for i in call.transfers:
                rows = flat[i].rows
                grads_of[i] = (dk_u[:, pos : pos + rows], dv_u[:, pos : pos + rows])
                pos += rows
        sends, i = [], 0
        for peer, ts in plan.recvs:  # gradients go back to the ranks the rows came from
            parts = []
            for _ in ts:
                gk, gv = grads_of[i]
                parts += [gk.to(q.dtype).reshape(-1), gv.to(q.dtype).reshape(-1)]
                i += 1
            sends.append((peer, torch.cat(parts)))
        recvs = [(p, q.new_empty(_kv_buffer_size(ts, b, d, False))) for p, ts in plan.sends]
        works = exchange(sends, recvs, args.group, _WHAT, "key/value gradients (backward)")
        # 2. Local blocks.
        for block, rng in zip(plan.own_blocks, ctx.rng_own):
            kv_rows = None if key_valid is None else _rows(key_valid, block).reshape(-1, block.span.rows)
            kk = _to_kernel(_heads(_rows(k, block), block.kv_heads))
            vv = _to_kernel(_heads(_rows(v, block), block.kv_heads))
            dk_b, dv_b = run(own_kernel, args.kernel, block, kk, vv, kv_rows, args.is_causal, rng)
            _add_heads(_rows(dk, block), block.kv_heads, _from_kernel(dk_b, b).to(acc))
            _add_heads(_rows(dv, block), block.kv_heads, _from_kernel(dv_b, b).to(acc))
        # 3. Gradients of the rows this rank sent, from the ranks that used them.
        wait_transfers(works, _WHAT, args.timeout_s, q.device)
        for (_, buf), (_, ts) in zip(recvs, plan.sends):
            for t, (gk, gv, _) in zip(ts, _unpack_kv(buf, ts, b, d, False)):
                idx = torch.tensor(t.kv_heads, device=q.device)
                _rows(dk, t.src_rows)[:, 0].index_add_(2, idx, gk.to(acc))
                _rows(dv, t.src_rows)[:, 0].index_add_(2, idx, gv.to(acc))
        if args.stats is not None:
            args.stats.backward_bytes_sent += sum(buf.numel() * buf.element_size() for _, buf in sends)
            args.stats.backward_bytes_received += sum(buf.numel() * buf.element_size() for _, buf in recvs)
            args.stats.messages_sent += len(sends)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


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
    key_valid = None if key_padding_mask is None else ~key_padding_mask
    remote_kernel = choose_kernel(_inputs(query, key_valid, False))  # e.g. FlashAttention-2 on CUDA bf16
    ring_args = _Args(plan, call.group, args.is_causal, args.scale, choice.kernel, remote_kernel, stats, call.timeout_s)
    out, lse_bnh = _RingFunction.apply(query, key, value, key_valid, ring_args)  # (b, n_local, h, d), (b, n_local, h)
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
    return (out, lse) if args.return_lse else out


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
