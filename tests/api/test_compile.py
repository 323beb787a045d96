"""torch.compile: the attention modules and LongNetLM compile with fullgraph=True (no graph break) and match
eager results, forward and gradients. On CPU the graph is run through AOTAutograd (``aot_eager``: the same
capture and functionalisation as inductor, without minutes of C++ code generation) and one module through
inductor; on a GPU every check runs through inductor."""

from __future__ import annotations

import warnings

import pytest
import torch

from dilated_attention_pytorch import DilatedAttention, MultiheadDilatedAttention
from dilated_attention_pytorch.models import LongNet, LongNetLM

from tests.helpers.tensors import DEVICES

BACKEND = {"cpu": "aot_eager", "cuda": "inductor"}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_dilated_attention_compiles_fullgraph(device, causal=True):
    dtype = torch.float64 if device == "cpu" else torch.float32
    module = DilatedAttention([4, 16], [1, 3], offsets="torchscale")
    q, k, v = (torch.randn(2, 37, 2, 8, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    pad = torch.zeros(2, 37, dtype=torch.bool, device=device)
    pad[1, 30:] = True
    compiled = torch.compile(module, fullgraph=True, backend=BACKEND[device])
    with warnings.catch_warnings(record=True) as caught:  # e.g. Dynamo tracing through an lru_cache lookup
        warnings.simplefilter("always")
        out = compiled(q, k, v, is_causal=causal, key_padding_mask=pad)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    dynamo = [str(w.message) for w in caught if "TensorFloat32" not in str(w.message)]  # inductor's TF32 advice
    assert not dynamo, dynamo
    ref = module(q, k, v, is_causal=causal, key_padding_mask=pad)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, **_tol(dtype))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **_tol(dtype))


def test_dilated_attention_compiles_with_inductor_on_cpu():
    module = DilatedAttention([4, 8], [1, 2])
    q, k, v = (torch.randn(2, 19, 4, 8) for _ in range(3))
    out = torch.compile(module, fullgraph=True)(q, k, v, is_causal=True)
    torch.testing.assert_close(out, module(q, k, v, is_causal=True), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_multihead_compiles_fullgraph(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    torch.manual_seed(0)
    module = MultiheadDilatedAttention(32, 4, segment_lengths=[4, 8], dilation_rates=[1, 2], num_kv_heads=2,
                                       dtype=dtype, device=device)
    x = torch.randn(2, 21, 32, dtype=dtype, device=device)
    compiled = torch.compile(module, fullgraph=True, backend=BACKEND[device])
    out, _ = compiled(x, x, x, is_causal=True)
    out.sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    ref, _ = module(x, x, x, is_causal=True)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, **_tol(dtype))
    for g, p in zip(grads, module.parameters()):
        torch.testing.assert_close(g, p.grad, **_tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_longnet_lm_compiles_fullgraph(device, positions="xpos"):
    dtype = torch.float64 if device == "cpu" else torch.float32
    torch.manual_seed(0)
    model = LongNetLM(vocab_size=64, embed_dim=16, num_heads=2, num_layers=2, segment_lengths=(4, 16),
                      dilation_rates=(1, 2), positions=positions).to(device=device, dtype=dtype)
    ids = torch.randint(0, 64, (2, 33), device=device)
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND[device])
    logits = compiled(ids)
    logits.logsumexp(-1).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(ids)
    ref.logsumexp(-1).sum().backward()
    torch.testing.assert_close(logits, ref, **_tol(dtype))
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, **_tol(dtype))


def test_longnet_encoder_decoder_compiles_fullgraph():
    torch.manual_seed(0)
    model = LongNet(vocab_size=30, embed_dim=16, num_heads=2, encoder_layers=1, decoder_layers=1,
                    segment_lengths=(4,), dilation_rates=(1,)).double()
    src, tgt = torch.randint(0, 30, (2, 13)), torch.randint(0, 30, (2, 9))
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[0, 10:] = True
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(src, tgt, pad)
    torch.testing.assert_close(out, model(src, tgt, pad), rtol=1e-10, atol=1e-10)
