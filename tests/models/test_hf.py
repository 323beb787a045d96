"""Hugging Face transformers integration: a tiny Llama built locally from a config (no download) runs with
``attn_implementation="dilated"``; with one pattern of segment >= n and dilation 1 it equals its own SDPA
output (padding included, and through ``generate`` with a key/value cache)."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch.integrations.huggingface import (
    dilated_attention_forward_factory,
    register_dilated_attention,
)
from dilated_attention_pytorch.reference import reference_dilated_attention

import transformers  # noqa: F401,E402  (the `hf` extra: part of the test environment, never skipped)


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).double().eval()


def _inputs():
    ids = torch.randint(0, 97, (3, 29))
    mask = torch.ones(3, 29, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    mask[2, 25:] = 0  # right padding
    return ids, mask


def _logits(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def test_one_full_pattern_equals_sdpa(llama):
    ids, mask = _inputs()
    ref = _logits(llama, "sdpa", ids, mask)
    register_dilated_attention([64], [1], name="dilated")
    out = _logits(llama, "dilated", ids, mask)
    valid = mask.bool()  # logits at padded query positions are not defined
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(_logits(llama, "dilated", ids, None), _logits(llama, "sdpa", ids, None),
                               rtol=1e-9, atol=1e-9)


def test_model_built_with_attn_implementation_dilated():
    from transformers import AutoModelForCausalLM

    name = register_dilated_attention([8, 16], [1, 2], name="dilated")
    model = AutoModelForCausalLM.from_config(_config(), attn_implementation=name).eval()
    assert model.config._attn_implementation == "dilated"
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 21, 97) and torch.isfinite(logits).all()


def test_generate_with_cache_equals_sdpa(llama):
    ids, mask = _inputs()
    ids, mask = ids[:2], mask[:2]
    register_dilated_attention([256], [1], name="dilated")
    llama.set_attn_implementation("sdpa")
    ref = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    llama.set_attn_implementation("dilated")
    out = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)


def test_dilated_patterns_run_and_stay_causal(llama):
    register_dilated_attention([4, 8, 16], [1, 2, 4], name="dilated_sparse")
    ids = torch.randint(0, 97, (2, 40))
    a = _logits(llama, "dilated_sparse", ids, None)
    changed = ids.clone()
    changed[:, 30:] = (changed[:, 30:] + 1) % 97
    b = _logits(llama, "dilated_sparse", changed, None)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[:, :30], b[:, :30], rtol=0, atol=1e-12)
    assert not torch.allclose(a, _logits(llama, "sdpa", ids, None))


class _Module(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("q_len", [23, 5, 1])
def test_attention_function_equals_reference(q_len):
    """The registered function on HF layouts (b, h, n, d), incl. new queries after cached keys."""
    fn = dilated_attention_forward_factory([4, 8], [1, 3], offsets="torchscale")
    b, h, h_kv, n, d = 2, 4, 2, 23, 8
    q = torch.randn(b, h, n, d, dtype=torch.float64)
    k, v = (torch.randn(b, h_kv, n, d, dtype=torch.float64) for _ in range(2))
    ref, _ = reference_dilated_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), [4, 8], [1, 3],
                                         is_causal=True, offsets="torchscale", scale=0.3)
    out, weights = fn(_Module(), q[:, :, n - q_len :], k, v, None, scaling=0.3)
    assert weights is None and out.shape == (b, q_len, h, d)
    torch.testing.assert_close(out, ref[:, n - q_len :], rtol=1e-10, atol=1e-10)


def test_attention_function_rejects_masks_it_cannot_honour():
    fn = dilated_attention_forward_factory([4], [1])
    q = torch.randn(1, 2, 6, 4)
    window = torch.ones(6, 6, dtype=torch.bool).tril().triu(-2)[None, None]  # sliding window
    with pytest.raises(ValueError, match="only causal/bidirectional attention with padding"):
        fn(_Module(), q, q, q, window)
    with pytest.raises(ValueError, match="4-D mask"):
        fn(_Module(), q, q, q, torch.ones(1, 6, dtype=torch.bool))
    bidirectional = _Module()
    bidirectional.is_causal = False
    with pytest.raises(ValueError, match="as many queries as keys"):
        fn(bidirectional, q[:, :, :2], q, q, None)
    with pytest.raises(ValueError, match="output_attentions"):
        fn(_Module(), q, q, q, None, output_attentions=True)
    with pytest.raises(ValueError, match="name"):
        register_dilated_attention([4], [1], name="sdpa")
