"""Incremental decoding: step t of the key/value cache equals row t of the full causal pass (float64 dense
reference), past the smallest segment and across segment boundaries; the cache stays bounded."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import dilated_attention
from dilated_attention_pytorch.models import DilatedKVCache, LongNet, LongNetLM
from dilated_attention_pytorch.patterns import head_groups_of, head_offsets
from dilated_attention_pytorch.reference import reference_dilated_attention

# (segments, dilations, offsets, h, h_kv, head_groups): r not dividing w, GQA, explicit offsets, groups.
CASES = [
    ((4,), (1,), "paper", 2, 2, False),
    ((3, 5), (1, 2), "paper", 4, 4, False),
    ((4, 8, 16), (1, 2, 4), "torchscale", 4, 2, False),
    ((5, 7), (2, 3), "group", 3, 1, False),
    ((6, 10), (4, 3), "paper", 6, 3, False),  # r does not divide w
    ((2, 6, 9), (1, 2, 3), "paper", 6, 2, True),  # head groups
    ((4, 12), (2, 3), [[1, 0, 1, 0], [2, 2, 0, 1]], 4, 4, False),  # explicit offsets
    ((16,), (4,), "paper", 3, 3, False),  # some heads see nothing at some steps
]


def _cache(ws, rs, offsets, h, h_kv, head_groups, b, d):
    return DilatedKVCache(
        segment_lengths=ws, dilation_rates=rs, offsets=offsets, head_groups=head_groups, num_heads=h,
        num_kv_heads=h_kv, head_dim=d, scale=None, batch_size=b, dtype=torch.float64,
    )


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("prompt", [0, 1, 7])
def test_cache_steps_equal_full_causal_rows(case, prompt):
    ws, rs, offsets, h, h_kv, head_groups = case
    b, d = 2, 8
    n = 2 * max(ws) + 5  # several segments of every pattern, last one partial
    g = torch.Generator().manual_seed(hash((str(case), prompt)) % 2**31)
    q = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, n, h_kv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, n, h_kv, d, generator=g, dtype=torch.float64)
    ref, _ = reference_dilated_attention(q, k, v, ws, rs, is_causal=True, offsets=offsets, head_groups=head_groups)
    cache = _cache(ws, rs, offsets, h, h_kv, head_groups, b, d)
    if prompt:
        cache.fill(k[:, :prompt], v[:, :prompt])
    assert cache.position == prompt
    for t in range(prompt, n):  # token by token
        out = cache.attend(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        torch.testing.assert_close(out[:, 0], ref[:, t], rtol=1e-12, atol=1e-12, msg=lambda m: f"step {t}: {m}")
    assert cache.position == n


def test_attend_several_tokens_at_once_equals_full_pass():
    ws, rs = (4, 8), (1, 2)
    q, k, v = (torch.randn(1, 21, 2, 4, dtype=torch.float64) for _ in range(3))
    full = dilated_attention(q, k, v, ws, rs, is_causal=True)
    cache = _cache(ws, rs, "paper", 2, 2, False, 1, 4)
    cache.fill(k[:, :5], v[:, :5])
    torch.testing.assert_close(cache.attend(q[:, 5:13], k[:, 5:13], v[:, 5:13]), full[:, 5:13], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache.attend(q[:, 13:], k[:, 13:], v[:, 13:]), full[:, 13:], rtol=1e-12, atol=1e-12)


def _capacity(ws, rs, offsets, h, head_groups, j):
    """Keys head j can see through the cache: Σ_i len(range(o_i(j), w_i, r_i)) over the patterns j uses."""
    users = head_groups_of(h, len(ws), head_groups)
    total = 0
    for i, (w, r) in enumerate(zip(ws, rs)):
        if j in users[i]:
            o = head_offsets(offsets, i, r, users[i])[list(users[i]).index(j)]
            total += len(range(o, w, r))
    return total


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_cache_is_bounded_by_the_segments_not_the_history(case):
    ws, rs, offsets, h, h_kv, head_groups = case
    b, d = 1, 4
    cache = _cache(ws, rs, offsets, h, h_kv, head_groups, b, d)
    # exact bound: per query head, the phase-matching keys of one segment per pattern
    assert cache.capacity_per_head == max(_capacity(ws, rs, offsets, h, head_groups, j) for j in range(h))
    assert cache.capacity_per_head <= sum(-(-w // r) for w, r in zip(ws, rs))
    bound = 2 * b * h * d * cache.capacity_per_head
    steps = 6 * max(ws) + 3
    x = torch.randn(b, steps, h_kv, d, dtype=torch.float64)
    sizes = []
    for t in range(steps):
        cache.attend(torch.randn(b, 1, h, d, dtype=torch.float64), x[:, t : t + 1], x[:, t : t + 1])
        sizes.append(cache.numel())
        assert cache.numel() <= bound  # buffers grow with a segment's keys, never past one segment
        assert cache.stored_keys() <= cache.numel() // (2 * b * d)
    assert len(set(sizes[max(ws):])) == 1  # after the longest segment: no allocation any more
    history = 2 * b * steps * h_kv * d  # what a full-history cache would hold
    assert sizes[-1] < history


def test_cache_stores_only_the_current_segment():
    """With one pattern (w=8, r=1) the cache holds exactly t mod 8 + 1 keys after step t."""
    cache = _cache((8,), (1,), "paper", 1, 1, False, 1, 2)
    for t in range(30):
        x = torch.randn(1, 1, 1, 2, dtype=torch.float64)
        cache.attend(x, x, x)
        assert cache.stored_keys() == t % 8 + 1


def test_cache_errors():
    cache = _cache((4,), (1,), "paper", 2, 2, False, 1, 4)
    with pytest.raises(ValueError, match="query must have shape"):
        cache.attend(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
    cache.attend(*(torch.randn(1, 1, 2, 4, dtype=torch.float64) for _ in range(3)))
    with pytest.raises(ValueError, match="empty cache"):
        cache.fill(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4))


def _model_logits_incremental(model, ids, prompt, chunks=1):
    state = model.new_state(ids.shape[0])
    parts = [model(ids[:, :prompt], state)]
    for t in range(prompt, ids.shape[1], chunks):
        parts.append(model(ids[:, t : t + chunks], state))
    return torch.cat(parts, dim=1), state


@pytest.mark.parametrize("positions", ["rotary", "xpos", None])
@pytest.mark.parametrize("prompt", [1, 6])
def test_lm_incremental_logits_equal_full_pass(positions, prompt):
    torch.manual_seed(0)
    model = LongNetLM(vocab_size=40, embed_dim=32, num_heads=4, num_kv_heads=2, num_layers=2,
                      segment_lengths=(3, 8, 16), dilation_rates=(1, 2, 4), positions=positions).double().eval()
    ids = torch.randint(0, 40, (2, 37))
    full = model(ids)
    inc, state = _model_logits_incremental(model, ids, prompt)
    torch.testing.assert_close(inc, full, rtol=1e-10, atol=1e-10)
    assert state.position == 37
    assert state.numel() < 2 * 2 * 37 * 2 * 8 * 2  # below a full-history cache of the 2 layers


def test_lm_incremental_with_head_groups_and_chunks():
    torch.manual_seed(1)
    model = LongNetLM(vocab_size=30, embed_dim=24, num_heads=3, num_layers=1, segment_lengths=(4, 9, 20),
                      dilation_rates=(1, 3, 5), head_groups=True, offsets="torchscale").double().eval()
    ids = torch.randint(0, 30, (1, 45))
    inc, _ = _model_logits_incremental(model, ids, 4, chunks=5)
    torch.testing.assert_close(inc, model(ids), rtol=1e-10, atol=1e-10)


def test_longnet_decoder_incremental_equals_teacher_forcing():
    torch.manual_seed(2)
    model = LongNet(vocab_size=30, embed_dim=32, num_heads=4, encoder_layers=2, decoder_layers=2,
                    segment_lengths=(4, 8), dilation_rates=(1, 2)).double().eval()
    src = torch.randint(0, 30, (2, 13))
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[1, 9:] = True
    tgt = torch.randint(0, 30, (2, 23))
    full = model(src, tgt, pad)
    kv = model.memory_kv(model.encode(src, pad))
    state = model.new_state(2)
    parts = [model.decode(tgt[:, :3], kv, pad, state)]
    parts += [model.decode(tgt[:, t : t + 1], kv, pad, state) for t in range(3, 23)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_lm_on_the_improved_route_decodes_and_block_sparse_refuses_a_cache():
    torch.manual_seed(3)
    model = LongNetLM(vocab_size=20, embed_dim=16, num_heads=2, num_layers=1, segment_lengths=(4, 8),
                      dilation_rates=(1, 2), attention_type="improved").double().eval()
    ids = torch.randint(0, 20, (1, 19))
    inc, _ = _model_logits_incremental(model, ids, 5)
    torch.testing.assert_close(inc, model(ids), rtol=1e-10, atol=1e-10)
    sparse = LongNetLM(vocab_size=20, embed_dim=16, num_heads=2, num_layers=1, segment_lengths=(4, 8),
                       dilation_rates=(1, 2), attention_type="block_sparse")
    with pytest.raises(ValueError, match="incremental decoding computes dilated attention"):
        sparse.new_state(1)
