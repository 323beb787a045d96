"""The fixed-shape decode cache in a CUDA graph (GPU only): two layers' steps (projections included) captured
once and replayed for 50 tokens across segment boundaries give the eager Triton steps and the torch path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dilated_attention_pytorch.models.static_decoding import StaticDilatedKVCache

pytestmark = pytest.mark.cuda

WS, RS = (16, 32, 64), (1, 2, 4)
H, H_KV, D, LAYERS = 8, 2, 64, 2


def _caches(backend, prompt_kv, starts, max_length):
    caches = []
    for k, v in prompt_kv:
        c = StaticDilatedKVCache(segment_lengths=WS, dilation_rates=RS, offsets="paper", head_groups=False,
                                 num_heads=H, num_kv_heads=H_KV, head_dim=D, scale=None, batch_size=k.shape[0],
                                 max_length=max_length, device="cuda", backend=backend, block_k=16)
        c.fill(k, v, sequence_starts=starts)
        caches.append(c)
    return caches


def _step(weights, caches, x):
    b = x.shape[0]
    for (wq, wk, wv, wo), c in zip(weights, caches):
        q, k, v = (F.linear(x, w).view(b, 1, -1, D) for w in (wq, wk, wv))
        x = x + F.linear(c.attend(q, k, v).reshape(b, 1, H * D), wo)
    return x


def test_graph_replays_equal_eager_steps():
    b, prompt, steps, e = 2, 40, 50, H * D  # positions 40..90: boundaries of every pattern
    starts = [0, 7]
    weights = [[torch.randn(o, e, device="cuda") * e**-0.5 for o in (H * D, H_KV * D, H_KV * D, e)]
               for _ in range(LAYERS)]
    prompt_kv = [tuple(torch.randn(b, prompt, H_KV, D, device="cuda") for _ in range(2)) for _ in range(LAYERS)]
    graphed, eager, torch_path = (_caches(backend, prompt_kv, starts, prompt + steps + 1)
                                  for backend in ("triton", "triton", "torch"))
    x = torch.randn(b, 1, e, device="cuda")
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # first step eagerly: compiles the kernels
        first = _step(weights, graphed, static_x)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        torch.testing.assert_close(first, _step(weights, eager, x), rtol=1e-5, atol=1e-5)
        _step(weights, torch_path, x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = _step(weights, graphed, static_x)
        for t in range(steps):
            x = torch.randn(b, 1, e, device="cuda")
            static_x.copy_(x)
            graph.replay()
            for c in graphed:
                c.replayed()
            ref = _step(weights, eager, x)
            torch.testing.assert_close(static_out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {t}: {m}")
            torch.testing.assert_close(static_out, _step(weights, torch_path, x), rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"step {t}, torch path: {m}")
    assert graphed[0].position == eager[0].position == prompt + steps + 1
    with pytest.raises(ValueError, match="past max_length"):
        graphed[0].replayed()
