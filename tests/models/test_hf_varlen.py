"""Hugging Face integration with variable-length batches: a small Llama built from a config (no download);
left-padded batches (forward and greedy ``generate``) and packed documents (``position_ids`` restarting
per document, or ``cu_seq_lens_q/k``) give, row by row, the logits of each sequence alone and unpadded."""

from __future__ import annotations

import random

import pytest
import torch

from dilated_attention_pytorch.integrations.huggingface import register_dilated_attention

import transformers  # noqa: F401,E402  (the `hf` extra: part of the test environment, never skipped)

TOL = dict(rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).double().eval()
    # several segments and dilations inside each sequence: where segments start matters
    model.set_attn_implementation(register_dilated_attention([4, 8, 16], [1, 2, 4], name="dilated_varlen"))
    return model


def alone(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


def test_left_padded_batch_equals_each_sequence_unpadded(llama):
    lengths = [random.randint(5, 30) for _ in range(3)] + [30]
    seqs = [torch.randint(0, 97, (n,)) for n in lengths]
    n = max(lengths)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):], mask[i, n - len(s):] = s, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate makes them (RoPE runs in float32)
    with torch.no_grad():
        logits = llama(ids, attention_mask=mask, position_ids=position_ids).logits
    for i, s in enumerate(seqs):
        torch.testing.assert_close(logits[i, n - len(s):], alone(llama, s), **TOL)


def test_left_padded_generate_equals_each_sequence_alone(llama):
    seqs = [torch.randint(0, 97, (n,)) for n in (random.randint(6, 12), random.randint(14, 20))]
    n = max(len(s) for s in seqs)
    ids = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):], mask[i, n - len(s):] = s, 1
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)  # no early stop at eos
    batched = llama.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kw)
    for i, s in enumerate(seqs):
        one = llama.generate(s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), output_scores=True,
                             return_dict_in_generate=True, **kw)
        assert torch.equal(batched.sequences[i, n:], one.sequences[0, len(s):])
        for step_b, step_1 in zip(batched.scores, one.scores):
            torch.testing.assert_close(step_b[i], step_1[0], **TOL)


def packed(lengths):
    seqs = [torch.randint(0, 97, (n,)) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return seqs, torch.cat(seqs), position_ids, cu


@pytest.mark.parametrize("use_cache", [False, True])  # False: transformers' block-diagonal mask; True: no mask
def test_packed_documents_by_position_ids_equal_each_document_alone(llama, use_cache):
    lengths = [random.randint(1, 25) for _ in range(4)]
    seqs, ids, position_ids, _ = packed(lengths)
    with torch.no_grad():
        logits = llama(ids[None], position_ids=position_ids[None], use_cache=use_cache).logits[0]
    start = 0
    for s in seqs:
        torch.testing.assert_close(logits[start:start + len(s)], alone(llama, s), **TOL)
        start += len(s)


def test_packed_rows_of_a_batch_equal_each_document_alone(llama):
    """Two packed rows of equal length: each row's documents alone (the batch is flattened, rows apart)."""
    rows = []
    for _ in range(2):
        first = random.randint(1, 20)
        rows.append(packed([first, 24 - first]))
    ids = torch.stack([r[1] for r in rows])
    position_ids = torch.stack([r[2] for r in rows])
    with torch.no_grad():
        logits = llama(ids, position_ids=position_ids, use_cache=False).logits
    for i, (seqs, *_rest) in enumerate(rows):
        start = 0
        for s in seqs:
            torch.testing.assert_close(logits[i, start:start + len(s)], alone(llama, s), **TOL)
            start += len(s)


def test_packed_documents_by_cu_seq_lens_equal_each_document_alone(llama):
    lengths = [random.randint(1, 25) for _ in range(3)]
    seqs, ids, position_ids, cu = packed(lengths)
    with torch.no_grad():
        logits = llama(ids[None], position_ids=position_ids[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=max(lengths), max_length_k=max(lengths)).logits[0]
    start = 0
    for s in seqs:
        torch.testing.assert_close(logits[start:start + len(s)], alone(llama, s), **TOL)
        start += len(s)
