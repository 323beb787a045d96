"""Small block calls of packed documents run as ONE variable-length call (``EngineOptions.pack_token_heads``,
:mod:`dilated_attention_pytorch.packing`): each document's output, LSE and gradients still equal the float64
reference of that document alone. On the CPU the packed call is one block call per distinct length."""

from __future__ import annotations

import dataclasses
import importlib.util
import random

import pytest
import torch

from dilated_attention_pytorch.engine import EngineOptions, documents_program, run_engine
from dilated_attention_pytorch.kernels import CpuFlashKernel

from tests.api.test_varlen import loss_and_grads, packed_inputs, per_document_reference, random_lengths

ALL = 1 << 40  # every task that may be packed is


def _documents(lengths):
    cu = torch.tensor([0] + lengths).cumsum(0).tolist()
    return (tuple(zip(cu[:-1], cu[1:])),)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("h, h_kv", [(4, 4), (6, 2)])
def test_packed_calls_match_each_document_alone(is_causal, h, h_kv):
    rng = random.Random()
    lengths = random_lengths(rng, rng.randint(3, 6), 90)
    ws, rs = (8, 16, 32), (1, 2, 4)  # r does not divide most documents' lengths: per-offset calls of few heads
    n = sum(lengths)
    opts = EngineOptions(tuple(min(w, n) for w in ws), rs, "paper", False, is_causal, 0.3, 0.0, CpuFlashKernel(),
                         chunk_tokens=n, pack_token_heads=ALL)
    program = documents_program(1, n, h, h_kv, False, opts, _documents(lengths))
    assert program.packed is not None and len(program.packed.members) >= 2
    assert not any(program.groups[g].tasks[t].writes[0] for g, t in program.packed.members)
    q, k, v, _ = packed_inputs(lengths, h, h_kv, 16)
    out, lse = run_engine(q[None], k[None], v[None], None, opts, _documents(lengths))
    ref, ref_lse = per_document_reference(q, k, v, lengths, ws, rs, is_causal=is_causal, scale=0.3)
    torch.testing.assert_close(out[0], ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse[0].T, ref_lse, atol=1e-10, rtol=0)
    g_out, g_lse = torch.randn_like(ref), torch.randn_like(ref_lse)  # the LSE's gradient too (delta)
    grads = loss_and_grads(out[0], lse[0].T, (q, k, v), g_out, g_lse)
    ref_grads = loss_and_grads(ref, ref_lse, (q, k, v), g_out, g_lse)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-9, rtol=0)


def test_only_small_tasks_are_packed():
    lengths = [300, 37, 5, 120]
    n, h = sum(lengths), 4
    opts = EngineOptions((8, 16, 64), (1, 2, 8), "paper", False, False, 0.3, 0.0, CpuFlashKernel(), chunk_tokens=n)
    assert documents_program(1, n, h, h, False, opts, _documents(lengths)).packed is None  # off by default
    limit = 40
    program = documents_program(1, n, h, h, False, dataclasses.replace(opts, pack_token_heads=limit),
                                _documents(lengths))
    members = set(program.packed.members)
    for gi, group in enumerate(program.groups):
        for ti, task in enumerate(group.tasks):
            span = task.q.block.span
            small = span.count * span.rows * len(task.q.block.head_list(h)) <= limit and not any(task.writes)
            assert ((gi, ti) in members) == small
    packed = program.packed
    bounds = [x for run in packed.patterns for x in run]
    assert bounds[0] == 0 and bounds[-1] == packed.total and bounds == sorted(bounds)  # runs tile the rows
    for start, stop in packed.patterns:  # within a pattern: lengths sorted, and no query row twice
        lengths_in = [n for at, n in zip(packed.starts, packed.lengths) if start <= at < stop]
        assert lengths_in == sorted(lengths_in)
        assert packed.q_index[start:stop].unique().numel() == stop - start


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_gather_and_add_kernels_equal_index_select_and_index_add(dtype):
    from dilated_attention_pytorch.kernels.triton_rows import add_rows, gather_rows

    rows, d = random.randint(40, 90), random.choice([16, 24])
    src = torch.randn(rows, d).to(dtype)
    index = torch.randint(0, rows, (random.randint(30, 70),))
    assert torch.equal(gather_rows(src, index), src.index_select(0, index))
    runs, at = [], 0
    while at < index.numel():  # distinct indices within each run
        stop = min(index.numel(), at + random.randint(1, 20))
        index[at:stop] = torch.randperm(rows)[:stop - at]
        runs.append((at, stop))
        at = stop
    grads = torch.randn(index.numel(), d).to(dtype)
    target = torch.randn(rows, d).to(dtype)
    expected = target.float().index_add(0, index, grads.float())
    add_rows(target, grads, index, runs)
    torch.testing.assert_close(target.float(), expected, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (the fused path's gather-merge)")
def test_packed_calls_with_the_fused_merge_and_a_late_starting_row():
    """The Triton gather-merge (its interpreter on the CPU) reads the packed call's outputs as each task's
    blocks; a second batch row (starting late) puts packed rows in another batch row."""
    rng = random.Random()
    lengths = random_lengths(rng, 3, 40)
    n = sum(lengths)
    ws, rs = (4, 8, 16), (1, 2, 4)
    opts = EngineOptions(tuple(min(w, n) for w in ws), rs, "paper", False, True, 0.25, 0.0, CpuFlashKernel(),
                         chunk_tokens=8, merge="triton", grads_in_input_dtype=True, pack_token_heads=ALL)
    q, k, v, _ = packed_inputs(lengths, 4, 2, 16)
    late = min(3, n - 1)
    documents = (_documents(lengths)[0], ((late, n),))
    inputs = [torch.stack([x.detach(), x.detach().flip(0)]).float().requires_grad_() for x in (q, k, v)]
    assert documents_program(2, n, 4, 2, False, opts, documents).packed is not None
    out, lse = run_engine(*inputs, None, opts, documents)
    ref, ref_lse = per_document_reference(q, k, v, lengths, ws, rs, is_causal=True, scale=0.25)
    flipped = [x.detach().flip(0)[late:].requires_grad_() for x in (q, k, v)]
    ref1, _ = per_document_reference(*flipped, [n - late], ws, rs, is_causal=True, scale=0.25)
    torch.testing.assert_close(out[0].double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse[0].double().T, ref_lse, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, late:].double(), ref1, atol=1e-5, rtol=0)
    g0, g1 = torch.randn_like(ref), torch.randn_like(ref1)
    grads = torch.autograd.grad((out[0].double() * g0).sum() + (out[1, late:].double() * g1).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * g0).sum(), (q, k, v))
    ref_grads1 = torch.autograd.grad((ref1 * g1).sum(), flipped)
    for g, rg, rg1 in zip(grads, ref_grads, ref_grads1):
        torch.testing.assert_close(g[0].double(), rg, atol=1e-4, rtol=0)
        torch.testing.assert_close(g[1, late:].double(), rg1, atol=1e-4, rtol=0)
        assert bool((g[1, :late] == 0).all())
