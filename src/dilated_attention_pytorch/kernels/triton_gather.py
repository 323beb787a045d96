"""A Triton kernel that gathers the outputs of all blocks of a chunk into the final tensor in one pass.

For each token ``t`` and head ``j``: the merged LSE ``L = log Σ_i exp(l_i)`` over the patterns that
cover ``(t, j)`` and the merged row ``Σ_i w_i O_i / Σ_i w_i`` with ``w_i = exp(l_i - max_i l_i)`` in
fp32 (:mod:`..merge`), written once in the output dtype — each block output is read once, nothing is
read-modified-written.

Block outputs stay where the block kernel put them; the kernel finds each row through a table of
block base pointers and strides and a table of ``(offset, head position, block ids)`` per pattern and
head. Registered as the ``torch.library`` custom op ``dilated_attention::gather_merge`` (it writes
``target`` and ``lse_target``; a fake implementation lets ``torch.compile`` keep it in its graph). Runs on
the CPU under ``TRITON_INTERPRET=1`` (how the CPU tests check it).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["GATHER_OP", "gather_blocks"]


def _kernel():
    from ._gather_kernel import gather_kernel  # imports triton: only when the fused path runs

    return gather_kernel


def _tables(blocks: Sequence, num_heads: int, m_len: int, segments: tuple, dilations: tuple,
            phases: Optional[tuple], full: Optional[tuple], slots: Optional[tuple]) -> tuple:
    """(pattern table [k, 4], head table [k, h, 5]) as nested lists: (W, r, phase, whole segments) and
    (offset, head position, whole-segments block, tail block, head block) with -1 where nothing covers.
    ``slots[i]``: block ``i``'s (pattern row, kind 0 whole / 1 tail / 2 head, offset or -1 for the block's
    own); without slots, blocks start at segment boundaries of rows ``[0, m_len)`` (phase 0)."""
    phases = phases or (0,) * len(segments)
    full = full or tuple(m_len // w for w in segments)
    pat = [[w, r, p, f] for w, r, p, f in zip(segments, dilations, phases, full)]
    head = [[[-1, 0, -1, -1, -1] for _ in range(num_heads)] for _ in segments]
    for bid, block in enumerate(blocks):
        if slots is None:
            i, off = block.pattern, -1
            kind = 0 if block.span.start == 0 and block.span.segment == segments[i] else 1
        else:
            i, kind, off = slots[bid]
        for pos, j in enumerate(block.head_list(num_heads)):
            entry = head[i][j]
            entry[0], entry[1] = block.head_offset(pos) if off < 0 else off, pos
            entry[2 + kind] = bid
    return pat, head


def _gather(target: torch.Tensor, lse_target: torch.Tensor, shift_target: Optional[torch.Tensor],
            total_target: Optional[torch.Tensor], sources: list[torch.Tensor], lses: list[torch.Tensor],
            tables: list[int], num_heads: int, num_patterns: int, block_t: int, num_warps: int) -> None:
    """``dilated_attention::gather_merge``: the kernel's launch. ``sources`` unit stride in D, ``lses``
    float32, ``tables`` the pattern table then the head table of :func:`_tables`, flattened; the merge's
    shift and sum of weights go to ``shift_target`` and ``total_target`` when given (both or neither)."""
    b, m_len, h_t, d = target.shape
    nb = len(sources)
    # every table in one int64 buffer, copied without blocking the host (a blocking copy would drain
    # the queue of block kernels before each gather)
    values = [s.data_ptr() for s in sources] + [x for s in sources for x in s.stride()[:3]]
    values += [x.data_ptr() for x in lses] + [x for t in lses for x in t.stride()[:3]]
    packed = torch.tensor(values + tables, dtype=torch.int64)
    if target.device.type == "cuda":
        packed = packed.pin_memory().to(target.device, non_blocking=True)
    src_tab, src_strides = packed[:nb], packed[nb : 4 * nb]
    lse_tab, lse_strides = packed[4 * nb : 5 * nb], packed[5 * nb : 8 * nb]
    pat_t, head_t = packed[8 * nb : 8 * nb + 4 * num_patterns], packed[8 * nb + 4 * num_patterns :]
    block_d = max(16, 1 << (d - 1).bit_length())
    grid = ((m_len + block_t - 1) // block_t, h_t, b)
    stats = shift_target is not None
    _kernel()[grid](
        target, lse_target, shift_target if stats else lse_target, total_target if stats else lse_target,
        src_tab, src_strides, lse_tab, lse_strides, pat_t, head_t,
        m_len, num_heads, num_patterns, d, *target.stride()[:3], *lse_target.stride(),
        BLOCK_T=block_t, BLOCK_D=block_d, WRITE_STATS=stats, num_warps=num_warps,
    )


GATHER_OP = torch.library.custom_op("dilated_attention::gather_merge", _gather,
                                    mutates_args=("target", "lse_target", "shift_target", "total_target"))


@GATHER_OP.register_fake
def _(target, lse_target, shift_target, total_target, sources, lses, tables, num_heads, num_patterns, block_t,
      num_warps) -> None:
    return None


def gather_blocks(
    target: torch.Tensor,
    lse_target: torch.Tensor,
    blocks: Sequence,
    sources: Sequence[torch.Tensor],
    lses: Sequence[torch.Tensor],
    *,
    num_heads: int,
    segments: tuple[int, ...],
    dilations: tuple[int, ...],
    block_t: Optional[int] = None,
    num_warps: int = 4,
    stats_target: Optional[Sequence[torch.Tensor]] = None,
    phases: Optional[tuple[int, ...]] = None,
    full: Optional[tuple[int, ...]] = None,
    slots: Optional[tuple[tuple[int, int, int], ...]] = None,
) -> None:
    """Write into ``target (b, m, h, D)`` (a strided view is fine, unit stride in D) and
    ``lse_target (b, m, h)`` (float32) the blocks' outputs merged by their log-sum-exps.

    ``sources[i]`` is block ``i``'s kernel-layout output ``(B, H', L, D)`` and ``lses[i]`` its LSE
    ``(B, H', L)``. ``block_t`` (rows per program) and ``num_warps`` are the launch's tile settings.
    ``stats_target``: two float32 tensors with ``lse_target``'s shape and strides that receive the
    merge's shift (the largest LSE, 0 where none is finite) and sum of weights, for the exact backward.
    ``phases``/``full``/``slots`` place blocks whose rows do not start at a segment boundary (a shard of a
    sequence): per pattern row, where row 0 lies in its segment and how many whole segments follow; per
    block, its pattern row, kind and offset (see ``_tables``; pattern rows may repeat a pattern, for a
    second partial result of the same rows).
    Eager calls run the op's Python body directly (the dispatcher's round trip into a Python op costs
    tens of microseconds of host time); traced code calls the op, which a compiled graph then holds.
    """
    if stats_target is not None and any(
            t.shape != lse_target.shape or t.stride() != lse_target.stride() or t.dtype != torch.float32
            for t in stats_target):
        raise ValueError("stats_target must be two float32 tensors with lse_target's shape and strides, but got "
                         f"{[(tuple(t.shape), t.stride(), t.dtype) for t in stats_target]}")
    shift_t, total_t = (None, None) if stats_target is None else stats_target
    pat, head = _tables(blocks, num_heads, target.shape[1], segments, dilations, phases, full, slots)
    tables = [x for row in pat for x in row] + [x for rows in head for row in rows for x in row]
    if block_t is None:
        block_t = 32 if target.shape[-1] <= 128 else 16  # fewer rows for wide heads (registers)
    (GATHER_OP if torch.compiler.is_compiling() else _gather)(
        target, lse_target, shift_t, total_t, [s if s.stride(-1) == 1 else s.contiguous() for s in sources],
        [x.float() for x in lses], tables, num_heads, len(segments), block_t, num_warps,
    )
