"""Small block calls packed into one variable-length kernel call.

Packed documents make many small block calls: a document shorter than a segment, or its last segment,
gives each offset of a dilated pattern a few hundred rows for one or two heads, a kernel launch that
fills a few of the GPU's multiprocessors. :func:`pack_tasks` picks such tasks (they stay in their groups,
whose merge reads their results); the executor runs all of them as ONE variable-length call (FlashAttention's ``cu_seqlens`` layout): their
rows are gathered into one ``(T, 1, D)`` tensor, each (task, segment, head) its own sequence, by an
index built once per program. Their outputs and LSEs come back as views in each task's kernel layout
``(B, H, L, ·)`` for the group's merge; in backward one variable-length call with the merged outputs
(as every task's backward, see :mod:`.executor`) and the gradients added back through the same index.

Tasks are ordered by pattern, then row count: sequences of one length are contiguous (on devices without
a variable-length kernel, the CPU, the call is one block call per run of one length, :func:`varlen_forward`),
and within one pattern no query row repeats (a row is in one block per pattern), so on the GPU the
gradients go back with one plain read-add-write launch per pattern (:mod:`.kernels.triton_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["Packed", "pack_tasks", "packed_backward", "packed_forward"]


@dataclass(frozen=True, eq=False)
class Packed:
    """Tasks ``members[i] = (group, task)`` run as one call: task ``i`` owns packed rows
    ``[starts[i], starts[i] + counts[i] * lengths[i])``, ``counts[i]`` sequences of ``lengths[i]`` rows."""

    members: tuple[tuple[int, int], ...]
    counts: tuple[int, ...]  # sequences (segments x heads) per task
    lengths: tuple[int, ...]  # rows per sequence, non-decreasing
    shapes: tuple[tuple[int, int, int], ...]  # per task (B, H, L): its kernel layout
    starts: tuple[int, ...]
    patterns: tuple[tuple[int, int], ...]  # (start, stop) of the packed rows of each pattern
    causal: bool
    q_index: torch.Tensor  # (T,) int64 on the CPU: row of the flat (b*n*h, D) query of each packed row
    kv_index: torch.Tensor  # (T,) of the flat (b*n*h_kv, D) keys and values
    _device: dict = field(default_factory=dict, repr=False)

    @property
    def total(self) -> int:
        return int(self.q_index.numel())

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q index, kv index, cu_seqlens int32) on ``device``, copied once."""
        if device not in self._device:
            cu = [0]
            for c, n in zip(self.counts, self.lengths):
                cu += [cu[-1] + n * (s + 1) for s in range(c)]
            self._device[device] = (self.q_index.to(device), self.kv_index.to(device),
                                    torch.tensor(cu, dtype=torch.int32, device=device))
        return self._device[device]


def _task_rows(task, group_rows, n: int, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices of a task's query and key/value rows, in kernel order (segment, head, row)."""
    block = task.q.block
    span, r = block.span, block.dilation
    batch, c0 = (group_rows[0].start, group_rows[1]) if group_rows is not None else (0, 0)
    q_heads = block.head_list(heads)
    kv_heads_list = _index_list(block.kv_heads, kv_heads)
    offsets = torch.tensor([block.head_offset(p) for p in range(len(q_heads))])
    seg = torch.arange(span.count)[:, None, None] * span.segment
    tok = batch * n + c0 + span.start + seg + offsets[None, :, None] + r * torch.arange(span.rows)[None, None, :]
    q_rows = tok * heads + torch.tensor(q_heads)[None, :, None]
    kv_rows = tok * kv_heads + torch.tensor(kv_heads_list)[None, :, None]
    return q_rows.flatten(), kv_rows.flatten()


def _index_list(index, count: int) -> list[int]:
    return list(range(count))[index] if isinstance(index, slice) else list(index)


def pack_tasks(groups, n: int, heads: int, kv_heads: int, token_heads: int) -> Optional[Packed]:
    """The tasks of ``groups`` (on ``(b, n, heads)`` queries) to run as one call, or None (fewer than two):
    those of at most ``token_heads`` rows x heads whose gradients are added (not written) and whose views
    are :class:`~.views.Rows` of the call's own rows. The tasks stay in their groups (for the merge)."""
    from .views import Rows

    chosen = []
    for gi, group in enumerate(groups):
        for ti, task in enumerate(group.tasks):
            if not isinstance(task.q, Rows) or task.space or any(task.writes):
                continue
            span = task.q.block.span
            if span.count * span.rows * len(task.q.block.head_list(heads)) <= token_heads:
                chosen.append((task.q.block.pattern, span.rows, gi, ti))
    if len(chosen) < 2:
        return None
    chosen.sort()
    members, counts, lengths, shapes, starts, q_parts, kv_parts, at = [], [], [], [], [], [], [], 0
    patterns: dict[int, list[int]] = {}
    for pattern, rows, gi, ti in chosen:
        task = groups[gi].tasks[ti]
        q_rows, kv_rows = _task_rows(task, groups[gi].rows, n, heads, kv_heads)
        h = len(task.q.block.head_list(heads))
        members.append((gi, ti))
        counts.append(task.q.block.span.count * h)
        lengths.append(rows)
        shapes.append((task.q.block.span.count, h, rows))
        starts.append(at)
        patterns.setdefault(pattern, [at, at])[1] = at + q_rows.numel()
        at += q_rows.numel()
        q_parts.append(q_rows)
        kv_parts.append(kv_rows)
    causal = {groups[gi].tasks[ti].causal for gi, ti in members}
    if len(causal) != 1:
        return None
    return Packed(tuple(members), tuple(counts), tuple(lengths), tuple(shapes), tuple(starts),
                  tuple(tuple(r) for r in patterns.values()), causal.pop(), torch.cat(q_parts), torch.cat(kv_parts))


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``x (b, n, h, D)`` as ``(T, 1, D)``."""
    if x.is_cuda:
        from .kernels.triton_rows import gather_rows

        return gather_rows(_flat(x), index).unsqueeze(1)
    return _flat(x).index_select(0, index).unsqueeze(1)


def packed_forward(packed: Packed, kernel, q, k, v, scale: float):
    """-> (per member task (out (B, H, L, D), lse (B, H, L) float32) views, saved state for backward)."""
    q_index, kv_index, cu = packed.on(q.device)
    qp, kp, vp = _gather(q, q_index), _gather(k, kv_index), _gather(v, kv_index)
    out, lse, state = varlen_forward(kernel, qp, kp, vp, packed, cu, scale)
    results = []
    for (bb, h, length), start in zip(packed.shapes, packed.starts):
        size = bb * h * length
        results.append((out.narrow(0, start, size).view(bb, h, length, -1),
                        lse.narrow(1, start, size).view(bb, h, length)))
    return results, state


def packed_backward(packed: Packed, kernel, state, dout, q, k, v, out, lse_bwd, delta, grads, scale: float) -> None:
    """Add the packed tasks' gradients into ``grads = (dq, dk, dv)`` (contiguous, the inputs' shapes), given
    what each task's backward takes in its group (see :mod:`.executor`): ``dout``, ``lse_bwd (b, n, h)`` and
    ``delta (b, n, h)`` or None, and the merged ``out``."""
    q_index, kv_index, cu = packed.on(q.device)

    def rows(x: torch.Tensor) -> torch.Tensor:  # (b, n, h) -> (1, T)
        return _flat(x.unsqueeze(-1)).index_select(0, q_index).view(1, -1)

    dq, dk, dv = varlen_backward(kernel, _gather(dout, q_index), _gather(q, q_index), _gather(k, kv_index),
                                 _gather(v, kv_index), _gather(out, q_index), rows(lse_bwd),
                                 None if delta is None else rows(delta), packed, cu, scale, state)
    for target, index, grad in zip(grads, (q_index, kv_index, kv_index), (dq, dk, dv)):
        distinct = target is grads[0] or target.shape[2] == q.shape[2]  # GQA: a key row serves several heads
        if target.is_cuda and distinct:
            from .kernels.triton_rows import add_rows

            add_rows(_flat(target), grad.squeeze(1), index, packed.patterns)
        else:
            _flat(target).index_add_(0, index, grad.squeeze(1).to(target.dtype))


def _flash_varlen(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def varlen_forward(kernel, q, k, v, packed: Packed, cu: torch.Tensor, scale: float):
    """One call over the packed sequences: q/k/v ``(T, 1, D)`` -> (out ``(T, 1, D)``, lse ``(1, T)`` (float32; float64 for float64),
    state). FlashAttention-2's variable-length kernel on CUDA in fp16/bf16; else one ``kernel`` call per
    distinct sequence length (sequences of one length are contiguous)."""
    longest = max(packed.lengths)
    if _flash_varlen(q):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, longest, longest, 0.0, packed.causal, False, scale=scale)
        return out, lse.float(), (rng, unused)
    outs, lses, states = [], [], []
    for start, stop, length in _runs(packed):
        blk = [x.narrow(0, start, stop - start).view(-1, length, 1, x.shape[-1]).transpose(1, 2) for x in (q, k, v)]
        o, s, rng = kernel.forward(*blk, key_valid=None, is_causal=packed.causal, scale=scale, dropout_p=0.0)
        outs.append(o.transpose(1, 2).reshape(-1, 1, q.shape[-1]))
        lses.append(s.reshape(1, -1))
        states.append(rng)
    return torch.cat(outs), torch.cat(lses, dim=1), states


def varlen_backward(kernel, dout, q, k, v, out, lse, delta, packed: Packed, cu: torch.Tensor, scale: float, state):
    """Gradients ``(T, 1, D)`` of the packed call, with the merged ``out``, ``lse (1, T)`` and ``delta (1, T)``
    (a gradient into the LSE) or None."""
    longest = max(packed.lengths)
    if _flash_varlen(q):
        if delta is not None:
            raise NotImplementedError("the variable-length flash kernel takes no gradient of the LSE")
        rng, unused = state
        return torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), cu, cu, longest, longest, 0.0,
            packed.causal, rng, unused, scale=scale)
    grads = ([], [], [])
    for (start, stop, length), rng in zip(_runs(packed), state):
        view = [x.narrow(0, start, stop - start).view(-1, length, 1, x.shape[-1]).transpose(1, 2)
                for x in (dout, q, k, v, out)]
        lse_b, delta_b = (None if x is None else x.narrow(1, start, stop - start).reshape(-1, 1, length)
                          for x in (lse, delta))
        g = kernel.backward(*view, lse_b, rng, key_valid=None, is_causal=packed.causal, scale=scale,
                            dropout_p=0.0, delta=delta_b)
        for acc, x in zip(grads, g):
            acc.append(x.transpose(1, 2).reshape(-1, 1, q.shape[-1]))
    return tuple(torch.cat(x) for x in grads)


def _runs(packed: Packed) -> list[tuple[int, int, int]]:
    """``(start, stop, length)`` of the packed rows of each distinct sequence length."""
    runs: list[list[int]] = []
    for start, c, length in zip(packed.starts, packed.counts, packed.lengths):
        if runs and runs[-1][2] == length:
            runs[-1][1] = start + c * length
        else:
            runs.append([start, start + c * length, length])
    return [tuple(r) for r in runs]
