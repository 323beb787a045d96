"""The executor: blocks of attention with their LSEs, merged by log-sum-exp; each block's backward with
the merged output and LSE. The one implementation of that idea, used by every path.

A :class:`Program` is a list of :class:`Group`\\ s of :class:`Task`\\ s. A task is one kernel call: its query
rows (a view of the query space, see :mod:`.views`), its key/value rows (a view of the call's own keys,
or of rows received from other ranks), whether it is causal, and its kernel. The tasks of a group write
the group's rows of the output: their partial results are merged relative to each row's largest LSE
(:mod:`.merge`: in PyTorch ops, or on the fused GPU path with one Triton gather kernel per group).
Groups bound the temporaries: the single-device engine makes one group per chunk of the sequence.

Backward is exact through the mixing: each task's kernel backward runs with the *merged* output, so
its share of the gradient is that of ``softmax(scale·QKᵀ + log C)·V``. In float32/float64 it runs with
the row's largest LSE and the incoming gradient divided by the row's sum of weights
(:func:`.merge.backward_stats`), so that the rounding of the merged LSE (``ulp(lse)``, large at large
logits) reaches no gradient. In float16/bfloat16 (the fused GPU path) it runs with the merged LSE: there
the scaled incoming gradient would be rounded to the input dtype, an error (2^-8 in bfloat16, 2^-11 in
float16) above the merged LSE's (``|lse|·2^-24``) below ``|lse| = 2^16`` and ``2^13``, and the scaling
would cost a pass over the gradient on the hot path.

An :class:`Exchange` (sequence parallelism) posts the call's key/value rows to other ranks before the
first task, is waited on just before the first task that reads received rows, and in backward sends
those rows' gradients back to their owners while the local tasks run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from .kernels import BlockInputs, BlockKernel, acc_dtype, has_key, host_checks
from .merge import backward_stats, finish_merge, lse_shift, merge_step
from .packing import Packed, packed_backward, packed_forward

__all__ = ["Exchange", "Gather", "Group", "Program", "Task", "execute"]

Space = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # keys, values, valid keys


class View(Protocol):
    def read(self, x: torch.Tensor) -> torch.Tensor: ...
    def mask(self, key_valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]: ...
    def add(self, target: torch.Tensor, src: torch.Tensor, write: bool = False) -> None: ...


class Exchange(Protocol):
    """Key/value rows moved between ranks for the tasks whose ``space`` is ``i >= 1``."""

    def post(self, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor]) -> Any: ...
    def wait(self, pending: Any) -> list[Space]: ...
    def post_grads(self, grads: list[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor) -> Any: ...
    def finish_grads(self, pending: Any, dk: torch.Tensor, dv: torch.Tensor) -> None: ...


@dataclass(frozen=True, eq=False)
class Task:
    q: View  # query rows, in the group's query space
    kv: View  # key/value rows, in key space ``space``
    kernel: BlockKernel
    causal: bool = False
    space: int = 0  # 0: the call's own keys and values; i >= 1: the exchange's i-th received rows
    pieces: Optional[tuple[tuple[View, View], ...]] = None  # backward in these (q, kv) pieces
    writes: tuple[bool, bool, bool] = (False, False, False)  # dq, dk, dv written, not added (runs first)


@dataclass(frozen=True)
class Gather:
    """The fused merge of a group: one Triton gather kernel (:func:`.kernels.triton_gather.gather_blocks`;
    ``phases``/``full``/``slots`` place blocks of rows that do not start at a segment boundary)."""

    segments: tuple[int, ...]
    dilations: tuple[int, ...]
    phases: Optional[tuple[int, ...]] = None
    full: Optional[tuple[int, ...]] = None
    slots: Optional[tuple[tuple[int, int, int], ...]] = None  # per task: (pattern row, kind, offset)


@dataclass(frozen=True, eq=False)
class Group:
    tasks: tuple[Task, ...]
    rows: Optional[tuple[slice, int, int]] = None  # (batch rows, start, stop) of query and key space; None: all
    gather: Optional[Gather] = None  # the fused merge; None: merge in PyTorch ops


@dataclass(frozen=True, eq=False)
class Program:
    groups: tuple[Group, ...]
    scale: float
    dropout_p: float = 0.0
    grads_in_input_dtype: bool = False  # accumulate gradients in the input dtype (no fp32 copy)
    exact_backward: bool = True  # float32/float64: the merge's (shift, total) backward
    exchange: Optional[Exchange] = None  # only with one group over all rows
    covers_all: bool = True  # False: some rows are in no group (zeros, LSE -inf, no gradient)
    packed: Optional[Packed] = None  # small tasks run as one variable-length call (see .packing)

    def __post_init__(self) -> None:
        if self.exchange is not None and (len(self.groups) != 1 or self.groups[0].rows is not None):
            raise ValueError("a Program with an exchange must have one group over all rows")


def _part(x: Optional[torch.Tensor], rows: Optional[tuple[slice, int, int]]) -> Optional[torch.Tensor]:
    return x if x is None or rows is None else x[rows[0], rows[1]:rows[2]]


def _read1(view: View, x: torch.Tensor) -> torch.Tensor:
    """A row-wise tensor through a view: (…) -> (B, H, L)."""
    return view.read(x.unsqueeze(-1)).squeeze(-1)


def _finite_padding(key_valid: torch.Tensor, *xs: torch.Tensor) -> bool:
    """Whether the padded rows of ``xs (b, n, ...)`` hold only finite values (a host sync; only those
    rows are copied)."""
    padded = ~key_valid
    return not bool(padded.any()) or all(bool(torch.isfinite(x[padded]).all()) for x in xs)


def _forward_task(task: Task, q, space: Space, program: Program, acc):
    k, v, valid = space
    mask = task.kv.mask(valid)
    out_b, lse_b, rng = task.kernel.forward(
        task.q.read(q), task.kv.read(k), task.kv.read(v), key_valid=mask, is_causal=task.causal,
        scale=program.scale, dropout_p=program.dropout_p, padding_finite=True,
    )
    lse_b = lse_b.to(acc)
    if mask is not None:  # rows whose keys are all padded: no keys, whatever the kernel said
        lse_b = lse_b.masked_fill(~has_key(mask, task.causal)[:, None, :], float("-inf"))
    return out_b, lse_b, rng


class _Execute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, program: Program, q, k, v, key_valid):
        acc = acc_dtype(q.dtype)
        if key_valid is not None and not (host_checks(k) and _finite_padding(key_valid, k, v)):
            # padded keys and values that may hold NaN or inf: zeros (once here, not once per task)
            k, v = (x.masked_fill(~key_valid[:, :, None, None], 0.0) for x in (k, v))
        exchange = program.exchange
        pending = None if exchange is None else exchange.post(k, v, key_valid)
        spaces: list[Optional[Space]] = [(k, v, key_valid)]
        if program.covers_all:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            lse = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
        else:  # rows no group covers: zeros and LSE -inf
            out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
            lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        stats = (torch.empty_like(lse), torch.empty_like(lse)) if q.dtype == acc and program.exact_backward else None
        rngs = []
        packed, packed_state = {}, None
        if program.packed is not None:
            members = program.packed.members
            results, packed_state = packed_forward(program.packed, _member_kernel(program), q, k, v, program.scale)
            packed = dict(zip(members, results))
        for gi, group in enumerate(program.groups):
            qg, rows = _part(q, group.rows), group.rows
            own = (_part(k, rows), _part(v, rows), _part(key_valid, rows))
            out_g, lse_g = _part(out, rows), _part(lse, rows)
            stats_g = None if stats is None else [_part(t, rows) for t in stats]
            results = []
            if group.gather is None:
                out_sum = torch.zeros(qg.shape, dtype=acc, device=q.device)
                lse_max = torch.full(lse_g.shape, float("-inf"), dtype=acc, device=q.device)
                total = torch.zeros(lse_g.shape, dtype=acc, device=q.device)
            for ti, task in enumerate(group.tasks):
                if task.space and len(spaces) == 1:
                    spaces += exchange.wait(pending)  # received rows: needed from here on
                if (gi, ti) in packed:
                    (out_b, lse_b), rng = packed[gi, ti], None
                else:
                    out_b, lse_b, rng = _forward_task(task, qg, own if task.space == 0 else spaces[task.space],
                                                      program, acc)
                rngs.append(rng)
                if group.gather is not None:
                    results.append((out_b, lse_b))
                    continue
                merged = merge_step(task.q.read(out_sum), _read1(task.q, lse_max), _read1(task.q, total),
                                    out_b.to(acc), lse_b)
                for target, x in zip((out_sum, lse_max.unsqueeze(-1), total.unsqueeze(-1)),
                                     (merged[0], merged[1].unsqueeze(-1), merged[2].unsqueeze(-1))):
                    task.q.write(target, x)
            if group.gather is not None:
                from .kernels.triton_gather import gather_blocks

                g = group.gather
                gather_blocks(out_g, lse_g, [t.q.block for t in group.tasks], [r[0] for r in results],
                              [r[1] for r in results], num_heads=q.shape[2], segments=g.segments,
                              dilations=g.dilations, stats_target=stats_g, phases=g.phases, full=g.full,
                              slots=g.slots)
                continue
            shift = lse_shift(lse_max)
            merged_out, merged_lse = finish_merge(out_sum, shift, total)
            out_g.copy_(merged_out)
            lse_g.copy_(merged_lse)
            if stats_g is not None:
                stats_g[0].copy_(shift)
                stats_g[1].copy_(total)
        if exchange is not None and len(spaces) == 1:
            spaces += exchange.wait(pending)
        ctx.save_for_backward(q, k, v, key_valid, out, lse, *(stats or (None, None)))
        ctx.program, ctx.rngs, ctx.received, ctx.packed_state = program, rngs, spaces[1:], packed_state
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, key_valid, out, lse, shift, total = ctx.saved_tensors
        program: Program = ctx.program
        acc = acc_dtype(q.dtype)
        if dout is None:
            dout = torch.zeros_like(out)
        new = torch.empty_like if program.covers_all else torch.zeros_like  # every group writes all its rows
        packed = program.packed
        layout = torch.preserve_format if packed is None else torch.contiguous_format  # packed: flat index_add
        grads = tuple(new(x, memory_format=layout) for x in (q, k, v))
        if packed is not None:  # the packed tasks' lse, dout and delta as their groups' backward makes them
            members = set(packed.members)
            p_lse, p_dout = torch.empty_like(lse), dout if shift is None else torch.empty_like(dout)
            p_delta = None if dlse is None else torch.empty_like(lse)
        received = ctx.received
        received_grads = [(torch.zeros(rk.shape, dtype=acc, device=q.device),
                           torch.zeros(rv.shape, dtype=acc, device=q.device)) for rk, rv, _ in received]
        kernels: dict = {}
        rngs = iter(ctx.rngs)
        exchange = program.exchange  # with an exchange, the program is one group over all rows
        for gi, group in enumerate(program.groups):
            rows = group.rows
            task_rngs = [next(rngs) for _ in group.tasks]
            targets = [_part(g, rows) for g in grads]
            if program.grads_in_input_dtype:  # accumulate straight into the gradients
                dq, dk, dv = targets
            else:
                dq, dk, dv = (torch.empty(t.shape, dtype=acc, device=q.device) for t in targets)
            for role, target in enumerate((dq, dk, dv)):
                if not any(t.writes[role] for t in group.tasks):
                    target.zero_()
            out_g, lse_g, dout_g = _part(out, rows), _part(lse, rows), _part(dout, rows)
            no_keys = lse_g == float("-inf")  # NaN rows are not "no keys": their NaN reaches their gradients
            delta = None
            if dlse is not None:  # d lse / d s = P: fold it into delta = rowsum(dO * O) - dlse
                delta = (dout_g.to(acc) * out_g.to(acc)).sum(-1) - _part(dlse, rows).masked_fill(no_keys, 0.0)
            if shift is None:
                lse_bwd = lse_g.masked_fill(no_keys, float("inf"))  # rows with no keys: P = 0
            else:
                lse_bwd, dout_g, delta = backward_stats(_part(shift, rows), _part(total, rows), dout_g, delta)
            tensors = (_part(q, rows), dout_g, out_g, lse_bwd, delta)
            if packed is not None:
                for full, part in ((p_lse, lse_bwd), (p_dout, dout_g), (p_delta, delta)):
                    if full is not None and full is not dout:
                        _part(full, rows).copy_(part)
            own = (_part(k, rows), _part(v, rows), _part(key_valid, rows))
            # received rows first, then the tasks that write their gradients (before any adds to their rows)
            order = sorted(range(len(group.tasks)), key=lambda i: (group.tasks[i].space == 0, not any(group.tasks[i].writes)))
            pending = None
            for i in order:
                task = group.tasks[i]
                if packed is not None and (gi, i) in members:
                    continue  # in the packed call, after every group
                if task.space == 0 and pending is None and exchange is not None:
                    pending = exchange.post_grads(received_grads, k)  # they travel while local tasks run
                space, space_grads = ((own, (dk, dv)) if task.space == 0 else
                                      (received[task.space - 1], received_grads[task.space - 1]))
                _backward_task(task, task_rngs[i], tensors, space, (dq, *space_grads), program, dlse is not None,
                               kernels)
            if exchange is not None:  # the gradients of the rows this rank sent, from the ranks that used them
                if pending is None:
                    pending = exchange.post_grads(received_grads, k)
                exchange.finish_grads(pending, dk, dv)
            if not program.grads_in_input_dtype:
                for target, grad in zip(targets, (dq, dk, dv)):
                    target.copy_(grad)
        if packed is not None:
            kernel = _backward_kernel(_member_kernel(program), q, False, program.dropout_p, dlse is not None, kernels)
            packed_backward(packed, kernel, ctx.packed_state, p_dout, q, k, v, out, p_lse, p_delta,
                            grads, program.scale)
        dq, dk, dv = grads
        if key_valid is not None:  # padded keys and values: exactly zero, even where a NaN in the real
            padded = ~key_valid[:, :, None, None]  # inputs reached them in a task as 0 * NaN
            dk.masked_fill_(padded, 0.0)
            dv.masked_fill_(padded, 0.0)
        return None, dq, dk, dv, None


def _member_kernel(program: Program) -> BlockKernel:
    """The block kernel of the packed tasks (one for all: they come from one engine program)."""
    gi, ti = program.packed.members[0]
    return program.groups[gi].tasks[ti].kernel


def _backward_task(task: Task, rng, tensors, space: Space, targets, program: Program, needs_delta: bool,
                   kernels: dict) -> None:
    q, dout, out, lse_bwd, delta = tensors
    k, v, valid = space
    dq, dk, dv = targets
    for qv, kvv in task.pieces or ((task.q, task.kv),):
        mask = kvv.mask(valid)
        kernel = _backward_kernel(task.kernel, q, mask is not None, program.dropout_p, needs_delta, kernels)
        dq_b, dk_b, dv_b = kernel.backward(
            qv.read(dout), qv.read(q), kvv.read(k), kvv.read(v), qv.read(out), _read1(qv, lse_bwd),
            rng if kernel is task.kernel else None, key_valid=mask, is_causal=task.causal, scale=program.scale,
            dropout_p=program.dropout_p, delta=None if delta is None else _read1(qv, delta), padding_finite=True,
        )
        qv.add(dq, dq_b, write=task.writes[0])
        kvv.add(dk, dk_b, write=task.writes[1])
        kvv.add(dv, dv_b, write=task.writes[2])


def _backward_kernel(kernel: BlockKernel, q: torch.Tensor, has_mask: bool, dropout_p: float, needs_delta: bool,
                     memo: dict) -> BlockKernel:
    """The task's kernel, or when a gradient flows into the LSE and it cannot take delta, one that can."""
    if not needs_delta:
        return kernel
    key = (kernel, has_mask)
    if key not in memo:
        inputs = BlockInputs(device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], has_key_mask=has_mask,
                             dropout=dropout_p > 0, needs_delta=True)
        if kernel.not_supported_reasons(inputs):
            from .kernels import choose_kernel

            kernel = choose_kernel(inputs)
        memo[key] = kernel
    return memo[key]


def execute(program: Program, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            key_valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``program`` -> ``(out (q's shape, q's dtype), lse (q.shape[:-1], float32/float64))``. Rows no
    task covers get zeros and LSE ``-inf``. ``key_valid``: valid keys ``(b, n_k)`` of the own key space."""
    return _Execute.apply(program, q, k, v, key_valid)

