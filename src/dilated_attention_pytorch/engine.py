"""The single-device engine: a dilated attention call as a :class:`~.executor.Program`.

Per pattern and offset, the rows a head covers are a strided view of the input (:class:`~.views.Rows`,
no gather copy); each such block is one task of the executor, which runs a dense block kernel on it,
merges the blocks by log-sum-exp relative to each row's largest LSE (LongNet Eq. 10, :mod:`.merge`) and
runs each block's backward with the merged output (see :mod:`.executor`).

The sequence is processed in chunks (one executor group each) whose boundaries are boundaries of every
pattern's segments, so fp32 temporaries are bounded by the chunk, not by ``n``; memory is O(n·w) with
no n×n matrix. Variable-length inputs (packed documents, rows that start late) are the groups of each
document's own program, shifted to where the document lies (:func:`documents_program`): no copy. A
chunk of part of the sequence is run one batch entry at a time: with several, its
segments are not evenly spaced in memory (the batch stride spans the whole sequence), and every block's
rows would be copied instead of viewed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

import torch

from .executor import Gather, Group, Program, Task, execute
from .kernels import BlockKernel
from .packing import pack_tasks
from .patterns import OffsetRule
from .lru import cached
from .planning import all_heads, chunk_bounds, covering_pattern, pieces, plan_blocks
from .views import Rows

__all__ = ["Documents", "EngineOptions", "documents_program", "engine_program", "run_engine"]

Documents = tuple[tuple[tuple[int, int], ...], ...]  # per batch row, its documents [start, stop)


@dataclass(frozen=True)
class EngineOptions:
    segment_lengths: tuple[int, ...]  # effective W_i = min(w_i, n)
    dilation_rates: tuple[int, ...]
    offsets: OffsetRule
    head_groups: bool
    is_causal: bool
    scale: float
    dropout_p: float
    kernel: BlockKernel
    chunk_tokens: int
    merge: str = "torch"  # "torch": merge in PyTorch ops; "triton": one gather kernel per chunk
    grads_in_input_dtype: bool = False  # accumulate dq/dk/dv over patterns in the input dtype (no fp32 copy)
    piece_token_heads: int = 1 << 62  # backward: kernel calls cover at most about this many token-heads
    pack_token_heads: int = 0  # documents: tasks of at most this many token-heads run as one call (.packing)


@lru_cache(maxsize=256)
def engine_program(b: int, n: int, num_heads: int, num_kv_heads: int, key_mask: bool, opts: EngineOptions) -> Program:
    """The executor program of a call on ``(b, n, num_heads)`` queries (``key_mask``: with valid keys)."""
    bounds = chunk_bounds(n, opts.segment_lengths, opts.chunk_tokens)
    batch_rows = [slice(0, b)] if b == 1 or len(bounds) == 1 else [slice(i, i + 1) for i in range(b)]
    groups = []
    for bs in batch_rows:
        for c0, c1 in bounds:
            segments = tuple(min(w, c1 - c0) for w in opts.segment_lengths)
            tasks = _chunk_tasks(bs.stop - bs.start, c1 - c0, num_heads, num_kv_heads, key_mask, segments, opts)
            gather = Gather(segments, opts.dilation_rates) if opts.merge == "triton" else None
            groups.append(Group(tasks, (bs, c0, c1), gather))
    return Program(tuple(groups), opts.scale, opts.dropout_p, opts.grads_in_input_dtype,
                   exact_backward=len(opts.segment_lengths) > 1)  # one pattern: shift = lse, total = 1


@lru_cache(maxsize=128)
def documents_program(b: int, n: int, num_heads: int, num_kv_heads: int, key_mask: bool, opts: EngineOptions,
                      documents: Documents) -> Program:
    """The program of a call whose batch row ``i`` holds the documents ``documents[i]``, each ``[start, stop)``
    its own sequence (segments from its first token, ``W_i = min(w_i, stop - start)``, no key of another
    document): each document's :func:`engine_program` groups, moved to its rows. Rows in no document get
    zeros and LSE ``-inf``."""
    groups = []
    for i, row in enumerate(documents):
        for start, stop in row:
            length = stop - start
            doc_opts = replace(opts, segment_lengths=tuple(min(w, length) for w in opts.segment_lengths),
                               chunk_tokens=min(opts.chunk_tokens, length))
            for g in cached(engine_program, 1, length, num_heads, num_kv_heads, key_mask, doc_opts).groups:
                _, c0, c1 = g.rows
                groups.append(Group(g.tasks, (slice(i, i + 1), start + c0, start + c1), g.gather))
    covers_all = len(documents) == b and all(sum(e - s for s, e in row) == n for row in documents)
    packed = None
    if opts.pack_token_heads and not key_mask and opts.dropout_p == 0:  # masks and random streams are per task
        packed = pack_tasks(groups, n, num_heads, num_kv_heads, opts.pack_token_heads)
    return Program(tuple(groups), opts.scale, opts.dropout_p, opts.grads_in_input_dtype,
                   exact_backward=len(opts.segment_lengths) > 1, covers_all=covers_all, packed=packed)


def _chunk_tasks(b: int, m: int, h: int, h_kv: int, key_mask: bool, segments: tuple[int, ...],
                 opts: EngineOptions) -> tuple[Task, ...]:
    blocks = cached(plan_blocks, m, h, h_kv, segments, opts.dilation_rates, opts.offsets, opts.head_groups,
                    not key_mask)  # no diagonal blocks under a key mask: their rows would differ by head
    # A pattern of dilation 1 gives every row to every head once: its gradients are written, not added,
    # so it runs first and the tensors it writes need no zeroing (one pass less over each).
    cover = covering_pattern(blocks, m, h)
    writes = tuple(cover is not None and all(all_heads(getattr(bl, role), count) for bl in blocks if bl.pattern == cover)
                   for role, count in (("heads", h), ("kv_heads", h_kv), ("kv_heads", h_kv)))
    tasks = []
    for block in blocks:
        # Pieces of the block bound the temporaries (a piece's gradients and the kernel's workspace);
        # a random stream belongs to the whole block, so blocks with dropout are not cut.
        limit = 1 << 62 if opts.dropout_p > 0 else opts.piece_token_heads
        parts = pieces(b, block.span.count, block.span.rows, len(block.head_list(h)), limit)
        tasks.append(Task(
            Rows(block, block.heads), Rows(block, block.kv_heads), opts.kernel, opts.is_causal,
            pieces=tuple((Rows(block, block.heads, p), Rows(block, block.kv_heads, p)) for p in parts),
            writes=writes if block.pattern == cover else (False, False, False),
        ))
    return tuple(tasks)


def run_engine(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_valid: Optional[torch.Tensor],
    opts: EngineOptions,
    documents: Optional[Documents] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (b, n, h, d), lse (b, n, h) in float32/float64). ``documents``: see :func:`documents_program`."""
    b, n, h, _ = query.shape
    if documents is None:
        program = cached(engine_program, b, n, h, key.shape[2], key_valid is not None, opts)
    else:
        program = cached(documents_program, b, n, h, key.shape[2], key_valid is not None, opts, documents)
    return execute(program, query, key, value, key_valid)
