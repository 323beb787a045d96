"""The Triton kernels as ``torch.library`` custom ops: ``dilated_attention::gather_merge`` (the fused
path's merge) and ``::block_sparse_fwd`` / ``::block_sparse_bwd``. ``opcheck`` on each (schema,
mutations, fake implementations, AOT dispatch), and ``torch.compile(fullgraph=True)`` keeping them in
its graph with results equal to eager. Without a GPU the kernels run in Triton's interpreter
(conftest sets ``TRITON_INTERPRET=1``), in float16 (its bfloat16 matmul is broken)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from dilated_attention_pytorch.block_sparse import block_sparse_attention  # noqa: E402
from dilated_attention_pytorch.block_sparse.triton_path import BWD_OP, FWD_OP, tile_settings  # noqa: E402
from dilated_attention_pytorch.kernels.triton_gather import GATHER_OP  # noqa: E402

from tests.helpers.tensors import rand_qkv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf in the interpreter


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def recording_backend(graphs: list, then: str = "eager"):
    """A compile backend that keeps the readable code of every graph (submodules included) it gets."""
    def backend(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return torch._dynamo.lookup_backend(then)(gm, example_inputs)

    return backend


def test_importing_the_package_does_not_import_triton():
    code = "import sys, dilated_attention_pytorch, torch; assert 'triton' not in sys.modules; " \
           "assert hasattr(torch.ops.dilated_attention, 'gather_merge')"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- gather_merge: two patterns over m = 16 tokens, h = 2 heads: (W 8, r 1) and (W 16, r 2, offsets 1, 0)
B, M, H, D = 2, 16, 2, 16
TABLES = [8, 1, 0, 2, 16, 2, 0, 1] + [0, 0, 0, -1, -1, 0, 1, 0, -1, -1] + [1, 0, 1, -1, -1, 0, 1, 1, -1, -1]


def _gather_inputs():
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(B * 2, H, 8, D, generator=gen), torch.randn(B, H, 8, D, generator=gen)]
    lse = [torch.randn(B * 2, H, 8, generator=gen), torch.randn(B, H, 8, generator=gen)]
    lse[1][0, 1, 3] = float("-inf")  # a row one pattern leaves empty
    src, lse = [s.to(DEVICE) for s in src], [x.to(DEVICE) for x in lse]
    target = torch.full((B, M, H, D), float("nan"), device=DEVICE)
    lse_target = torch.full((B, M, H), float("nan"), device=DEVICE)
    return target, lse_target, src, lse


def _gather_reference(src, lse):
    """Pattern 0 covers every row; pattern 1 the rows t with t % 2 == offset of the head."""
    out0 = src[0].view(B, 2, H, 8, D).permute(0, 1, 3, 2, 4).reshape(B, M, H, D)
    l0 = lse[0].view(B, 2, H, 8).permute(0, 1, 3, 2).reshape(B, M, H)
    out1, l1 = torch.zeros_like(out0), torch.full_like(l0, float("-inf"))
    for j, off in enumerate((1, 0)):
        out1[:, off::2, j] = src[1][:, j]
        l1[:, off::2, j] = lse[1][:, j]
    big = torch.logaddexp(l0, l1)
    return torch.exp(l0 - big)[..., None] * out0 + torch.exp(l1 - big)[..., None] * out1, big


def _gather(target, lse_target, src, lse):
    torch.ops.dilated_attention.gather_merge(target, lse_target, None, None, src, lse, TABLES, H, 2, 32, 4)


def test_gather_op_merges_by_log_sum_exp():
    target, lse_target, src, lse = _gather_inputs()
    _gather(target, lse_target, src, lse)
    ref, ref_lse = _gather_reference(src, lse)
    torch.testing.assert_close(target, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_target, ref_lse, atol=1e-5, rtol=1e-5)


def test_gather_opcheck():
    target, lse_target, src, lse = _gather_inputs()
    torch.library.opcheck(GATHER_OP, (target, lse_target, None, None, src, lse, TABLES, H, 2, 32, 4))


def test_gather_op_compiles_fullgraph():
    """Into a view of a larger buffer (as the engine writes each chunk), inside a compiled graph."""
    graphs = []

    def run(src, lse):
        out = torch.zeros(B, M + 4, H, D, device=DEVICE)
        lse_out = torch.empty(B, M, H, device=DEVICE)
        _gather(out[:, 2 : 2 + M], lse_out, src, lse)
        return out, lse_out

    _, _, src, lse = _gather_inputs()
    out, lse_out = torch.compile(run, fullgraph=True, backend=recording_backend(graphs, "aot_eager"))(src, lse)
    ref, ref_lse = run(src, lse)
    assert torch.equal(out, ref) and torch.equal(lse_out, ref_lse)
    assert "dilated_attention.gather_merge" in graphs[0]


# -- block_sparse_fwd / block_sparse_bwd
def _tiles():
    return [int(x) for x in tile_settings(16, torch.device(DEVICE)).__dict__.values()]


@pytest.mark.parametrize("lse_grad", [False, True])
def test_block_sparse_opcheck(lse_grad):
    n, h, bs = 200, 2, 128
    q, k, v = rand_qkv(1, n, h, 1, 16, dtype=torch.float16, device=DEVICE, requires_grad=False)
    layout = torch.tensor([[[True, False], [True, True]]], device=DEVICE)
    settings = (layout, bs, True, 0.25, None, _tiles())
    torch.library.opcheck(FWD_OP, (q, k, v, *settings))
    out, lse = FWD_OP(q, k, v, *settings)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse) if lse_grad else None
    torch.library.opcheck(BWD_OP, (q, k, v, out, lse, dout, dlse, *settings))


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_compiles_fullgraph(causal):
    """block_sparse_attention(backend="triton") under torch.compile(fullgraph=True): both ops in the
    graph (no break), forward, LSE and gradients bit-equal to eager (the same kernels in the same order)."""
    n, h, bs = 256, 2, 128
    layout = torch.tensor([[[True, False], [True, True]], [[True, True], [False, True]]], device=DEVICE)
    q, k, v = rand_qkv(2, n, h, 1, 16, dtype=torch.float16, device=DEVICE)

    def fn(q, k, v):
        out, lse = block_sparse_attention(q, k, v, layout, block_size=bs, is_causal=causal, return_lse=True,
                                          backend="triton")
        return out, lse

    graphs = []
    compiled = torch.compile(fn, fullgraph=True, backend=recording_backend(graphs, "aot_eager"))
    g_out = torch.randn(2, n, h, 16, dtype=torch.float16, device=DEVICE)
    results = []
    for f in (compiled, fn):
        out, lse = f(q, k, v)
        loss = (out.float() * g_out).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
        results.append((out, lse, *torch.autograd.grad(loss, (q, k, v))))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert len(graphs) == 1
    assert "dilated_attention.block_sparse_fwd" in graphs[0] and "dilated_attention.block_sparse_bwd" in graphs[0]
    assert torch._dynamo.explain(fn)(q, k, v).graph_break_count == 0
