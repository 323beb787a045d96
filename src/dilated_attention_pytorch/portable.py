"""The portable path: per pattern, dilated rows through strided views, a fused aten kernel per block,
an fp32 log-sum-exp merge, and an exact backward (each block's backward with the merged output and LSE).

Memory is O(n·w): the largest temporary is one block's scores inside a kernel, never an n×n matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from .kernels import BlockInputs, BlockKernel, acc_dtype, choose_kernel
from .merge import merge_partials
from .patterns import OffsetRule, RowSpan, pattern_groups, row_spans

__all__ = ["portable_dilated_attention", "plan_blocks", "Block"]

HeadIndex = Union[slice, tuple[int, ...]]


@dataclass(frozen=True)
class Block:
    """One kernel call: the rows of one offset of one pattern, for a set of query heads."""

    span: RowSpan
    offset: int
    dilation: int
    heads: HeadIndex  # query heads
    kv_heads: HeadIndex  # the key/value head of each query head (may repeat under GQA)


def _as_index(heads: Sequence[int]) -> HeadIndex:
    """A slice when ``heads`` is an arithmetic progression without repeats (a view, no copy)."""
    if len(heads) == 1:
        return slice(heads[0], heads[0] + 1)
    step = heads[1] - heads[0]
    if step > 0 and all(b - a == step for a, b in zip(heads, heads[1:])):
        return slice(heads[0], heads[-1] + 1, step)
    return tuple(heads)


def plan_blocks(
    n: int,
    num_heads: int,
    num_kv_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    offsets: OffsetRule,
    head_groups: bool,
) -> list[Block]:
    group = num_heads // num_kv_heads
    blocks = []
    for pg in pattern_groups(n, num_heads, segment_lengths, dilation_rates, offsets, head_groups):
        heads, kv = _as_index(pg.heads), _as_index([j // group for j in pg.heads])
        for span in row_spans(n, pg.segment, pg.dilation, pg.offset):
            blocks.append(Block(span, pg.offset, pg.dilation, heads, kv))
    return blocks


def _rows(x: torch.Tensor, block: Block) -> torch.Tensor:
    """View (b, count, rows, ...) of the block's rows of ``x (b, n, ...)``; no copy."""
    span = block.span
    seg = x.narrow(1, span.start, span.count * span.segment).unflatten(1, (span.count, span.segment))
    return seg[:, :, block.offset :: block.dilation]


def _heads(x: torch.Tensor, index: HeadIndex) -> torch.Tensor:
    """Select heads (dim 3) of a (b, count, rows, H, ...) tensor: a view for a slice, else a copy."""
    if isinstance(index, slice):
        return x[:, :, :, index]
    return x.index_select(3, torch.tensor(index, device=x.device))


def _add_heads(target: torch.Tensor, index: HeadIndex, src: torch.Tensor) -> None:
    """target[:, :, :, index] += src, summing repeated indices."""
    if isinstance(index, slice):
        target[:, :, :, index] += src
    else:
        target.index_add_(3, torch.tensor(index, device=target.device), src)


def _to_kernel(x5: torch.Tensor) -> torch.Tensor:
    """(b, count, rows, H, D) -> (b*count, H, rows, D)."""
    b, s, c, h, d = x5.shape
    x = x5.reshape(b * s, c, h, d).transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()  # fused kernels need unit stride in head_dim


def _from_kernel(x: torch.Tensor, b: int) -> torch.Tensor:
    """(b*count, H, rows, ...) -> (b, count, rows, H, ...)."""
    x = x.transpose(1, 2)
    return x.reshape(b, x.shape[0] // b, *x.shape[1:])


def _has_key(key_valid: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """(B, L) valid keys -> (B, L): whether each query row of the block sees at least one key."""
    if is_causal:
        return key_valid.cumsum(-1) > 0
    return key_valid.any(-1, keepdim=True).expand_as(key_valid)


@dataclass
class _Args:
    blocks: list[Block]
    is_causal: bool
    scale: float
    dropout_p: float
    kernels: list[BlockKernel]
    rng_states: list[Any]


class _DilatedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, args: _Args):
        b, n, h, d = q.shape
        acc = acc_dtype(q.dtype)
        out_acc = torch.zeros(b, n, h, d, dtype=acc, device=q.device)
        lse_acc = torch.full((b, n, h), float("-inf"), dtype=acc, device=q.device)
        for block, kernel in zip(args.blocks, args.kernels):
            kv_rows = None if key_valid is None else _rows(key_valid, block).reshape(-1, block.span.rows)
            out_b, lse_b, rng = kernel.forward(
                _to_kernel(_heads(_rows(q, block), block.heads)),
                _to_kernel(_heads(_rows(k, block), block.kv_heads)),
                _to_kernel(_heads(_rows(v, block), block.kv_heads)),
                key_valid=kv_rows, is_causal=args.is_causal, scale=args.scale, dropout_p=args.dropout_p,
            )
            args.rng_states.append(rng)
            out_b, lse_b = out_b.to(acc), lse_b.to(acc)
            if kv_rows is not None:
                has_key = _has_key(kv_rows, args.is_causal)[:, None, :]  # (B, 1, L)
                out_b = out_b.masked_fill(~has_key[..., None], 0.0)
                lse_b = lse_b.masked_fill(~has_key, float("-inf"))
            out_view = _rows(out_acc, block)
            lse_view = _rows(lse_acc, block)
            idx = block.heads if isinstance(block.heads, slice) else list(block.heads)
            merged_out, merged_lse = merge_partials(
                out_view[:, :, :, idx], lse_view[:, :, :, idx], _from_kernel(out_b, b), _from_kernel(lse_b, b)
            )
            out_view[:, :, :, idx] = merged_out
            lse_view[:, :, :, idx] = merged_lse
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, key_valid, out, lse_acc)
        ctx.args = args
        ctx.set_materialize_grads(False)
        return out, lse_acc

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, key_valid, out, lse_acc = ctx.saved_tensors
        args: _Args = ctx.args
        b = q.shape[0]
        acc = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        if dout is None:
            dout = torch.zeros_like(out)
        lse_bwd = torch.where(torch.isfinite(lse_acc), lse_acc, float("inf"))  # no keys: P = 0
        delta_full = None
        if dlse is not None:  # d lse / d s = P: fold it into delta = rowsum(dO * O) - dlse
            delta_full = (dout.to(acc) * out.to(acc)).sum(-1) - torch.nan_to_num(dlse, posinf=0, neginf=0)
        for block, kernel, rng in zip(args.blocks, args.kernels, args.rng_states):
            if delta_full is not None and kernel.not_supported_reasons(_inputs_like(q, key_valid, args, True)):
                kernel = choose_kernel(_inputs_like(q, key_valid, args, True))
            kv_rows = None if key_valid is None else _rows(key_valid, block).reshape(-1, block.span.rows)
            qh = lambda x, idx: _to_kernel(_heads(_rows(x, block), idx))  # noqa: E731
            delta = None if delta_full is None else qh(delta_full.unsqueeze(-1), block.heads).squeeze(-1)
            dq_b, dk_b, dv_b = kernel.backward(
                qh(dout, block.heads), qh(q, block.heads), qh(k, block.kv_heads), qh(v, block.kv_heads),
                qh(out, block.heads), qh(lse_bwd.unsqueeze(-1), block.heads).squeeze(-1), rng,
                key_valid=kv_rows, is_causal=args.is_causal, scale=args.scale, dropout_p=args.dropout_p,
                delta=delta,
            )
            _add_heads(_rows(dq, block), block.heads, _from_kernel(dq_b, b).to(acc))
            _add_heads(_rows(dk, block), block.kv_heads, _from_kernel(dk_b, b).to(acc))
            _add_heads(_rows(dv, block), block.kv_heads, _from_kernel(dv_b, b).to(acc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _inputs_like(q: torch.Tensor, key_valid, args: _Args, needs_delta: bool) -> BlockInputs:
    return BlockInputs(
        device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], has_key_mask=key_valid is not None,
        dropout=args.dropout_p > 0, needs_delta=needs_delta,
    )


def portable_dilated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool,
    scale: float,
    dropout_p: float,
    offsets: OffsetRule,
    head_groups: bool,
    key_padding_mask: Optional[torch.Tensor],
    lse_needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (b, n, h, d), lse (b, n, h) in float32/float64). Inputs are already validated."""
    b, n, h, _ = query.shape
    blocks = plan_blocks(n, h, key.shape[2], segment_lengths, dilation_rates, offsets, head_groups)
    key_valid = None if key_padding_mask is None else ~key_padding_mask
    # With dropout, a block's backward must reuse its forward kernel's random stream, so the kernel
    # that can take an LSE gradient is chosen up front when that gradient may come.
    args = _Args(blocks, is_causal, scale, dropout_p, [], [])
    kernel = choose_kernel(_inputs_like(query, key_valid, args, lse_needs_grad and dropout_p > 0))
    args.kernels = [kernel] * len(blocks)
    return _DilatedAttentionFunction.apply(query, key, value, key_valid, args)


def describe_kernel(query: torch.Tensor, key_padding_mask: Optional[torch.Tensor], dropout_p: float) -> str:
    """Name of the block kernel the portable path runs for these inputs."""
    args = _Args([], False, 1.0, dropout_p, [], [])
    return choose_kernel(_inputs_like(query, key_padding_mask, args, False)).name
