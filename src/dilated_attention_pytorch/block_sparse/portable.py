"""The portable block-sparse path: the active tiles of a layout as tasks of the executor
(:mod:`..executor`), one batched dense kernel call per group of tiles in which every (head, query block)
row appears at most once (:mod:`.plan`), merged by log-sum-exp (one joint softmax per row) with an exact
blockwise backward.

Memory is O(active tiles): the largest temporary is one call's ``(b, R, block, block)`` scores inside a
kernel, bounded by :data:`_CHUNK_ELEMENTS`; nothing of size n x n is ever formed.
"""

from __future__ import annotations

import torch

from ..executor import Group, Program, Task, execute
from ..kernels import BlockInputs, choose_kernel
from ..views import Tiles
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


def _chunks(call: BlockCall, batch: int, block_size: int, head_dim: int) -> list[BlockCall]:
    rows = max(1, _CHUNK_ELEMENTS // (batch * block_size * max(block_size, head_dim)))
    if call.heads.numel() <= rows:
        return [call]
    return [
        BlockCall(h, q, k, call.causal, call.key_len)
        for h, q, k in zip(call.heads.split(rows), call.q_blocks.split(rows), call.k_blocks.split(rows))
    ]


def _program(q: torch.Tensor, plan: BlockPlan, group: int, scale: float, needs_delta: bool) -> Program:
    b, bs, d = q.shape[0], plan.block_size, q.shape[-1]
    tasks = []
    for call in (c for full in plan.calls for c in _chunks(full, b, bs, d)):
        inputs = BlockInputs(device_type=q.device.type, dtype=q.dtype, head_dim=d, has_key_mask=call.key_len != bs,
                             dropout=False, needs_delta=needs_delta)
        tasks.append(Task(Tiles(call.heads, call.q_blocks, bs, bs, b),
                          Tiles(call.heads // group, call.k_blocks, call.key_len, bs, b),
                          choose_kernel(inputs), call.causal))
    return Program((Group(tuple(tasks)),), scale)


def portable_block_sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: BlockPlan, *, scale: float, lse_needs_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (b, nq, h, d), lse (b, h, nq) float32/float64). Inputs validated; ``plan`` from the layout."""
    b, n, h, d = query.shape
    program = _program(query, plan, h // key.shape[2], scale, lse_needs_grad)
    qb = _to_blocks(query, plan.q_blocks, plan.block_size)  # (b, h, nq, bs, d); padded keys are zeros
    kb, vb = (_to_blocks(x, plan.k_blocks, plan.block_size) for x in (key, value))
    out, lse = execute(program, qb, kb, vb)  # (b, h, nq, bs, d), (b, h, nq, bs)
    return out.reshape(b, h, -1, d)[:, :, :n].transpose(1, 2), lse.reshape(b, h, -1)[:, :, :n]
