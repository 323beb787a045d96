"""torch.compile of the fused path on CUDA (GPU only)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("fresh_dynamo")]


@pytest.mark.parametrize("module_class", ["DilatedAttention", "ImprovedDilatedAttention"])
def test_fused_path_compiles_fullgraph_with_the_gather_op_in_the_graph(module_class):
    """torch.compile(fullgraph=True) of a module on CUDA bf16 runs the fused path: the gather-merge
    custom op sits inside the compiled graph (no break, no fallback to the portable path), and the
    result and gradients equal eager."""
    import dilated_attention_pytorch as dap

    torch.manual_seed(0)
    module = getattr(dap, module_class)([64, 128], [1, 2], backend="fused")
    q, k, v = (torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    out = torch.compile(module, fullgraph=True, backend=recording_inductor)(q, k, v, is_causal=True)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = module(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    assert len(graphs) == 1 and graphs[0].count("dilated_attention.gather_merge") >= 1
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)
