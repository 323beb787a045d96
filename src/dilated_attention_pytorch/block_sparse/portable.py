"""The portable block-sparse path: one batched dense kernel call per group of active tiles, an fp32
log-sum-exp merge of the tiles of each row (one joint softmax), and an exact blockwise backward.

The merge keeps, per row, the largest tile LSE ``m``, the sum of weights ``Σ exp(l_c - m)`` and the
weighted sum of tile outputs, rescaled when ``m`` grows (an online softmax over tiles): weights are
never taken relative to a rounded merged LSE (see :mod:`..merge`). In float32/float64 the backward runs
each tile with ``lse = m`` and the incoming gradient divided by the sum of weights, so that the merged
LSE's rounding reaches no gradient either; in float16/bfloat16 with the merged LSE (see
:mod:`..engine`).

Memory is O(active tiles): the largest temporary is one call's ``(b, R, block, block)`` scores inside a
kernel, bounded by :data:`_CHUNK_ELEMENTS`; nothing of size n x n is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..kernels import BlockInputs, acc_dtype, choose_kernel
from ..merge import backward_stats, finish_merge, lse_shift
from .plan import BlockCall, BlockPlan

__all__ = ["portable_block_sparse_attention"]

_CHUNK_ELEMENTS = 1 << 25  # b * R * block * max(block, d) elements per kernel call at most


def _to_blocks(x: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """(b, L, H, D) -> (b, H, num_blocks, block_size, D), zero-padded at the end."""
    b, length, h, d = x.shape
    x = x.transpose(1, 2)
    pad = num_blocks * block_size - length
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(b, h, num_blocks, block_size, d)


def _from_blocks(x: torch.Tensor, length: int) -> torch.Tensor:
    """(b, H, nb, bs, D) -> (b, length, H, D)."""
    b, h, nb, bs, d = x.shape
    return x.reshape(b, h, nb * bs, d)[:, :, :length].transpose(1, 2)


def _chunks(call: BlockCall, batch: int, block_size: int, head_dim: int) -> list[BlockCall]:
    rows = max(1, _CHUNK_ELEMENTS // (batch * block_size * max(block_size, head_dim)))
    if call.heads.numel() <= rows:
        return [call]
    return [
        BlockCall(h, q, k, call.causal, call.key_len)
        for h, q, k in zip(call.heads.split(rows), call.q_blocks.split(rows), call.k_blocks.split(rows))
    ]


def _key_valid(call: BlockCall, batch: int, block_size: int, device) -> Optional[torch.Tensor]:
    if call.key_len == block_size:
        return None
    return (torch.arange(block_size, device=device) < call.key_len).expand(batch, block_size)


def _inputs(q: torch.Tensor, call: BlockCall, block_size: int, needs_delta: bool) -> BlockInputs:
    return BlockInputs(
        device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1],
        has_key_mask=call.key_len != block_size, dropout=False, needs_delta=needs_delta,
    )


@dataclass
class _Args:
    plan: BlockPlan
    group: int  # query heads per key/value head
    scale: float
    needs_delta: bool
    calls: list[BlockCall] = field(default_factory=list)
    rng_states: list[Any] = field(default_factory=list)


class _BlockSparseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, args: _Args):
        plan = args.plan
        b, nq_tokens, h, d = q.shape
        bs = plan.block_size
        acc = acc_dtype(q.dtype)
        qb = _to_blocks(q, plan.q_blocks, bs)  # (b, h, nq, bs, d)
        kb = _to_blocks(k, plan.k_blocks, bs)  # (b, h_kv, nk, bs, d)
        vb = _to_blocks(v, plan.k_blocks, bs)
        out_acc = torch.zeros(b, h, plan.q_blocks, bs, d, dtype=acc, device=q.device)  # sum of w_c * out_c
        lse_max = torch.full((b, h, plan.q_blocks, bs), float("-inf"), dtype=acc, device=q.device)
        total = torch.zeros(b, h, plan.q_blocks, bs, dtype=acc, device=q.device)  # sum of w_c
        args.calls = [c for call in plan.calls for c in _chunks(call, b, bs, d)]
        for call in args.calls:
            kv_heads = call.heads // args.group
            kernel = choose_kernel(_inputs(q, call, bs, args.needs_delta))
            out_c, lse_c, rng = kernel.forward(
                qb[:, call.heads, call.q_blocks],  # (b, R, bs, d)
                kb[:, kv_heads, call.k_blocks],
                vb[:, kv_heads, call.k_blocks],
                key_valid=_key_valid(call, b, bs, q.device), is_causal=call.causal, scale=args.scale, dropout_p=0.0,
                padding_finite=True,  # the keys past the end are _to_blocks' zeros
            )
            args.rng_states.append(rng)
            rows = (slice(None), call.heads, call.q_blocks)  # each (head, query block) once per call
            old_max = lse_max[rows]
            new_max = torch.maximum(old_max, lse_c.to(acc))  # propagates NaN
            shift = lse_shift(new_max)
            rescale, weight = torch.exp(old_max - shift), torch.exp(lse_c.to(acc) - shift)  # (b, R, bs)
            out_acc[rows] = out_acc[rows] * rescale.unsqueeze(-1) + out_c.to(acc) * weight.unsqueeze(-1)
            total[rows] = total[rows] * rescale + weight
            lse_max[rows] = new_max
        shift = lse_shift(lse_max)
        out_acc, lse_acc = finish_merge(out_acc, shift, total)
        out = _from_blocks(out_acc, nq_tokens).to(q.dtype)  # (b, n, h, d)
        lse = lse_acc.reshape(b, h, -1)[:, :, :nq_tokens]  # (b, h, n)
        stats = (None, None)
        if q.dtype == acc:  # float32/float64: the exact backward takes the merge's shift and total
            stats = tuple(t.reshape(b, h, -1)[:, :, :nq_tokens] for t in (shift, total))
        ctx.save_for_backward(q, k, v, out, lse, *stats)
        ctx.args = args
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, shift, total = ctx.saved_tensors
        args: _Args = ctx.args
        plan = args.plan
        b, nq_tokens, h, d = q.shape
        h_kv = k.shape[2]
        bs = plan.block_size
        acc = acc_dtype(q.dtype)
        if dout is None:
            dout = torch.zeros_like(out)
        qb = _to_blocks(q, plan.q_blocks, bs)
        kb = _to_blocks(k, plan.k_blocks, bs)
        vb = _to_blocks(v, plan.k_blocks, bs)
        outb = _to_blocks(out, plan.q_blocks, bs)
        no_keys = lse == float("-inf")  # (b, h, n); NaN rows are not "no keys": their NaN reaches their gradients
        delta_bhn = None
        if dlse is not None:  # d lse / d s = P: fold it into delta = rowsum(dO * O) - dlse
            delta_bhn = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2) - dlse.masked_fill(no_keys, 0.0)
        if shift is None:  # rows with no key: LSE +inf makes P = 0 in every kernel's backward
            lse_bwd = lse.masked_fill(no_keys, float("inf"))
        else:
            lse_bwd, dout_bhn, delta_bhn = backward_stats(shift, total, dout.transpose(1, 2), delta_bhn)
            dout = dout_bhn.transpose(1, 2)
        doutb = _to_blocks(dout, plan.q_blocks, bs)
        lseb = _to_blocks(lse_bwd.transpose(1, 2).unsqueeze(-1), plan.q_blocks, bs).squeeze(-1)  # (b,h,nq,bs)
        delta = None
        if delta_bhn is not None:
            delta = _to_blocks(delta_bhn.transpose(1, 2).unsqueeze(-1), plan.q_blocks, bs).squeeze(-1)
        dq = torch.zeros(b, h * plan.q_blocks, bs, d, dtype=acc, device=q.device)
        dk = torch.zeros(b, h_kv * plan.k_blocks, bs, d, dtype=acc, device=q.device)
        dv = torch.zeros(b, h_kv * plan.k_blocks, bs, d, dtype=acc, device=q.device)
        for call, rng in zip(args.calls, args.rng_states):
            kv_heads = call.heads // args.group
            kernel = choose_kernel(_inputs(q, call, bs, args.needs_delta or delta is not None))
            rows = (slice(None), call.heads, call.q_blocks)
            keys = (slice(None), kv_heads, call.k_blocks)
            dq_c, dk_c, dv_c = kernel.backward(
                doutb[rows], qb[rows], kb[keys], vb[keys], outb[rows], lseb[rows], rng,
                key_valid=_key_valid(call, b, bs, q.device), is_causal=call.causal, scale=args.scale,
                dropout_p=0.0, delta=None if delta is None else delta[rows], padding_finite=True,
            )
            dq.index_add_(1, call.heads * plan.q_blocks + call.q_blocks, dq_c.to(acc))
            key_index = kv_heads * plan.k_blocks + call.k_blocks
            dk.index_add_(1, key_index, dk_c.to(acc))
            dv.index_add_(1, key_index, dv_c.to(acc))
        dq = _from_blocks(dq.view(b, h, plan.q_blocks, bs, d), nq_tokens)
        dk = _from_blocks(dk.view(b, h_kv, plan.k_blocks, bs, d), k.shape[1])
        dv = _from_blocks(dv.view(b, h_kv, plan.k_blocks, bs, d), k.shape[1])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def portable_block_sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: BlockPlan, *, scale: float, lse_needs_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (b, nq, h, d), lse (b, h, nq) float32/float64). Inputs validated; ``plan`` from the layout."""
    group = query.shape[2] // key.shape[2]
    return _BlockSparseFunction.apply(query, key, value, _Args(plan, group, scale, lse_needs_grad))
