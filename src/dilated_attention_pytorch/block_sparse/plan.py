"""Index plans for the portable path: the active (head, query block, key block) triples of a layout,
grouped into kernel calls in which every (head, query block) row appears at most once.

Triples are sorted CSR-style (by head, query block, key block); the ``r``-th active key block of every
row goes to call ``r``, so the calls' sizes add up to the number of active blocks and each call is one
batched dense kernel call on ``block_size``-square tiles. Tiles that need a mask inside the tile get calls
of their own: the diagonal tile under ``is_causal`` (causal inside the tile) and the last key block when
``n % block_size != 0`` (its tail keys are padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockCall", "BlockPlan", "build_plan"]


@dataclass(frozen=True)
class BlockCall:
    """One batched kernel call over ``R`` tiles: query tile ``(heads[i], q_blocks[i])`` with key tile
    ``(heads[i] // group, k_blocks[i])``; every (head, query block) pair appears at most once."""

    heads: torch.Tensor  # (R,) long, query head
    q_blocks: torch.Tensor  # (R,) long, local query block
    k_blocks: torch.Tensor  # (R,) long, local key block
    causal: bool  # the tile is on the diagonal of a causal layout: key u <= query t inside the tile
    key_len: int  # valid keys at the start of the tile (block_size unless it is the padded last block)


@dataclass(frozen=True)
class BlockPlan:
    num_heads: int
    q_blocks: int  # query blocks held locally
    k_blocks: int  # key blocks held locally
    block_size: int
    calls: tuple[BlockCall, ...]
    active_blocks: int  # tiles computed (after dropping causally empty ones)


def _split_by_rank(heads, qb, kb, rows_total: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Group triples (sorted by row) by their rank within their row."""
    if heads.numel() == 0:
        return []
    row = heads * rows_total + qb
    counts = torch.bincount(row)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(row.numel(), device=row.device) - starts[row]
    order = torch.argsort(rank, stable=True)
    sizes = torch.bincount(rank).tolist()
    return list(zip(heads[order].split(sizes), qb[order].split(sizes), kb[order].split(sizes)))


def build_plan(
    layout: torch.Tensor,
    q_blocks_global: torch.Tensor,
    k_blocks_global: torch.Tensor,
    seq_len: int,
    block_size: int,
    is_causal: bool,
) -> BlockPlan:
    """``layout (H, nq, nk)`` bool over local query blocks and local key blocks whose global block
    indices are ``q_blocks_global (nq,)`` and ``k_blocks_global (nk,)`` on a sequence of ``seq_len``."""
    num_heads, nq, nk = layout.shape
    device = layout.device
    qg = q_blocks_global.to(device)[None, :, None]
    kg = k_blocks_global.to(device)[None, None, :]
    active = layout.clone()
    diag = torch.zeros_like(active)
    if is_causal:
        active &= kg <= qg
        diag = active & (kg == qg)
    last_global = (seq_len - 1) // block_size
    last_len = seq_len - last_global * block_size
    last = (kg == last_global).expand_as(active) if last_len != block_size else torch.zeros_like(active)
    calls = []
    for is_diag in (False, True):
        for is_last in (False, True):
            mask = active & (diag if is_diag else ~diag) & (last if is_last else ~last)
            h, q, k = mask.nonzero(as_tuple=True)
            for part in _split_by_rank(h, q, k, nq):
                calls.append(BlockCall(*part, causal=is_diag, key_len=last_len if is_last else block_size))
    return BlockPlan(num_heads, nq, nk, block_size, tuple(calls), int(active.sum()))
