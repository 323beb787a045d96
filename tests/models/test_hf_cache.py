"""Hugging Face decoding with dilated attention: ``generate`` with the bounded ``DilatedCache`` equals
``generate`` with the default cache and without a cache (greedy tokens and step logits, float64), across
segment boundaries of every pattern and past the largest segment, batch > 1, GQA; the bounded cache's size
stays constant over thousands of steps."""

from __future__ import annotations

import pytest
import torch

import transformers  # noqa: F401  (the `hf` extra: part of the test environment, never skipped)
from dilated_attention_pytorch.integrations.hf_cache import DilatedCache
from dilated_attention_pytorch.integrations.huggingface import DECODE_KEY, register_dilated_attention

WS, RS = (4, 8, 16), (1, 2, 4)


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).double().eval()
    model.set_attn_implementation(register_dilated_attention(WS, RS, name="dilated_decode_test"))
    return model


def _generate(model, ids, **kwargs):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.scores)


def test_generate_with_bounded_cache_equals_default_cache_and_no_cache(llama):
    ids = torch.randint(0, 97, (3, 11))  # 11 + 30 tokens: past every segment boundary, past the largest
    cache = DilatedCache(llama.config, WS, RS)
    bounded, bounded_scores = _generate(llama, ids, cache=cache)
    default, default_scores = _generate(llama, ids)
    plain, plain_scores = _generate(llama, ids, use_cache=False)
    assert torch.equal(bounded, plain) and torch.equal(default, plain)
    torch.testing.assert_close(bounded_scores, plain_scores, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(default_scores, plain_scores, rtol=1e-9, atol=1e-9)
    assert cache.get_seq_length() == 11 + 30 - 1  # the last token is sampled, never fed back


def test_bounded_cache_size_is_constant_over_thousands_of_steps(llama):
    cfg = llama.config
    b, h, h_kv, d = 2, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache = DilatedCache(cfg, WS, RS)
    k, v = torch.randn(b, h_kv, 5, d), torch.randn(b, h_kv, 5, d)
    keys, values = cache.update(k, v, 0, kwargs={})  # a prompt: returned whole for the block path
    assert torch.equal(keys, k) and torch.equal(values, v)
    sizes = []
    for step in range(3000):
        k, v, q = torch.randn(b, h_kv, 1, d), torch.randn(b, h_kv, 1, d), torch.randn(b, h, 1, d)
        kwargs = {}
        cache.update(k, v, 0, kwargs=kwargs)
        out = kwargs[DECODE_KEY].attend(q, k, v, None)
        assert out.shape == (b, 1, h, d) and torch.isfinite(out).all()
        sizes.append(cache.numel())
    assert cache.get_seq_length() == 3005
    bound = 2 * b * d * sum(len(range(o, w, r)) * h_kv for w, r in zip(WS, RS) for o in range(r))
    assert len(set(sizes[max(WS):])) == 1 and sizes[-1] <= bound  # flat after the first full segments


def test_bounded_cache_rejects_padded_batches(llama):
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padded"):
        llama.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                       cache=DilatedCache(llama.config, WS, RS))


def test_bad_patterns_raise(llama):
    with pytest.raises(ValueError, match="dilation_rates"):
        DilatedCache(llama.config, (4, 8), (1,))


def test_generate_with_fixed_shape_cache_equals_no_cache(llama):
    """``DilatedCache(..., max_length=...)``: fixed-shape layers (the torch path on the CPU) give the greedy
    tokens and step logits of generation without a cache; beam search (rows reordered in place) gives the
    default cache's beams."""
    ids = torch.randint(0, 97, (2, 11))
    cache = DilatedCache(llama.config, WS, RS, max_length=11 + 30)
    static, static_scores = _generate(llama, ids, cache=cache)
    plain, plain_scores = _generate(llama, ids, use_cache=False)
    assert torch.equal(static, plain)
    torch.testing.assert_close(static_scores, plain_scores, rtol=1e-9, atol=1e-9)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, num_beams=3, do_sample=False,
                  pad_token_id=0)
    beams = llama.generate(ids, cache=DilatedCache(llama.config, WS, RS, max_length=11 + 12), **kwargs)
    torch.testing.assert_close(beams, llama.generate(ids, **kwargs), rtol=0, atol=0)
