"""Prompts of different lengths in one batch (left padding, ``prompt_lengths`` / ``sequence_starts``): each row
decodes exactly as its prompt alone, on the bounded cache, and the padding is never read."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch.models import DilatedKVCache, LongNetLM
from dilated_attention_pytorch.reference import reference_dilated_attention
from dilated_attention_pytorch.training import generate as generate_cli
from dilated_attention_pytorch.training.checkpoint import save_checkpoint

VOCAB = 40
LENGTHS = [7, 2, 12]  # generation crosses segment boundaries of every pattern, at different phases per row
NEW = 14


def _model(positions: str) -> LongNetLM:
    return LongNetLM(vocab_size=VOCAB, embed_dim=24, num_heads=4, num_kv_heads=2, num_layers=2,
                     segment_lengths=(3, 5, 8), dilation_rates=(1, 2, 3), positions=positions).double().eval()


def _padded(prompts: list[torch.Tensor]) -> torch.Tensor:
    """Left-padded with random token ids."""
    width = max(len(p) for p in prompts)
    ids = torch.randint(0, VOCAB, (len(prompts), width))
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
    return ids


def _nan_padding(model: LongNetLM, ids: torch.Tensor, lengths: list[int]):
    """Make the embeddings of ``ids``' padding columns NaN whenever the model embeds that batch: padding that
    reached a real row would make it NaN."""
    def hook(_, inputs, out):
        if inputs[0].shape == ids.shape and torch.equal(inputs[0], ids):
            out = out.clone()
            for i, m in enumerate(lengths):
                out[i, : ids.shape[1] - m] = float("nan")
            return out
        return None
    return model.embed.register_forward_hook(hook)


@pytest.mark.parametrize("positions", ["rotary", "xpos"])
def test_batch_of_padded_prompts_equals_each_prompt_alone(positions):
    model = _model(positions)
    prompts = [torch.randint(0, VOCAB, (n,)) for n in LENGTHS]
    ids = _padded(prompts)
    n = ids.shape[1]
    _nan_padding(model, ids, LENGTHS)
    out = model.generate(ids, NEW, temperature=0, prompt_lengths=torch.tensor(LENGTHS))
    assert out.shape == (3, n + NEW) and torch.equal(out[:, :n], ids)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], NEW, temperature=0)
        assert torch.equal(out[i, n:], alone[0, len(p):]), f"prompt {i}"

    # each step's logits are the full causal pass over that row's unpadded tokens (float64)
    state = model.new_state(3)
    steps = [model(ids, state, sequence_starts=[n - m for m in LENGTHS])[:, -1]]
    steps += [model(out[:, t : t + 1], state)[:, -1] for t in range(n, n + NEW)]
    for cache in state.layers:  # bounded by the patterns, below the history of n + NEW columns
        assert cache.numel() <= 2 * 3 * cache.num_heads * cache.head_dim * cache.capacity_per_head
        assert cache.numel() < 2 * 3 * (n + NEW) * cache.num_kv_heads * cache.head_dim
    for i, m in enumerate(LENGTHS):
        full = model(out[i : i + 1, n - m :])[0, m - 1 :]  # (NEW + 1, vocab)
        torch.testing.assert_close(torch.stack([s[i] for s in steps]), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [
    ((3, 5, 8), (1, 2, 3), "paper", 6, 2, False),
    ((2, 6, 9), (1, 2, 3), "torchscale", 6, 3, True),  # head groups
    ((16,), (4,), "paper", 3, 3, False),  # some heads see nothing at some steps
])
def test_cache_rows_with_their_own_starts_equal_each_row_alone_and_stay_bounded(case):
    ws, rs, offsets, h, h_kv, head_groups = case
    b, d, n, steps = 4, 4, 9, 2 * max(ws) + 3
    starts = torch.randperm(n)[:3].tolist()
    starts.append(starts[0])  # three different starts (one maybe 0), rows 0 and 3 share one
    total = n + steps
    q = torch.randn(b, total, h, d, dtype=torch.float64)
    k, v = (torch.randn(b, total, h_kv, d, dtype=torch.float64) for _ in range(2))
    for i, s in enumerate(starts):  # padding columns: never read
        q[i, :s], k[i, :s], v[i, :s] = float("nan"), float("inf"), float("nan")
    cache = DilatedKVCache(segment_lengths=ws, dilation_rates=rs, offsets=offsets, head_groups=head_groups,
                           num_heads=h, num_kv_heads=h_kv, head_dim=d, scale=None, batch_size=b, dtype=torch.float64)
    cache.fill(k[:, :n], v[:, :n], starts)
    outs, sizes = [], []
    for t in range(n, total - 1):
        outs.append(cache.attend(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1]))
        sizes.append(cache.numel())
        assert cache.stored_keys() <= cache.numel() // (2 * b * d)
    assert max(sizes) <= 2 * b * h * d * cache.capacity_per_head  # per row one segment's keys, whatever the start
    assert len(set(sizes[max(ws):])) == 1  # no growth once every row has passed its longest segment
    keep = [3, 2, 0]
    cache.reorder(torch.tensor(keep))  # rows keep their own starts and fills
    assert cache.starts == tuple(starts[i] for i in keep)
    last = cache.attend(*(x[keep, total - 1 :] for x in (q, k, v)))
    got = torch.cat(outs, dim=1)
    for i, s in enumerate(starts):
        ref, _ = reference_dilated_attention(q[i : i + 1, s:], k[i : i + 1, s:], v[i : i + 1, s:], ws, rs,
                                             is_causal=True, offsets=offsets, head_groups=head_groups)
        torch.testing.assert_close(got[i], ref[0, n - s : -1], rtol=1e-12, atol=1e-12, msg=lambda m: f"row {i}: {m}")
        if i in keep:
            torch.testing.assert_close(last[keep.index(i), 0], ref[0, -1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lengths, error, match", [
    ([3, 2], ValueError, r"prompt_lengths must have one length per prompt \(batch=3\), but got 2"),
    (torch.tensor([[3, 2, 1]]), ValueError, r"prompt_lengths must have shape \(batch,\) = \(3,\)"),
    ([3, 0, 1], ValueError, r"prompt_lengths\[1\] must be >= 1, but got 0"),
    ([3, 6, 1], ValueError, r"prompt_lengths\[1\] must be in \[1, seq=5\].*but got 6"),
    ([3, 2.5, 1], TypeError, r"prompt_lengths\[1\] must be an int, but got 2.5"),
    (torch.tensor([3.0, 2.0, 1.0]), TypeError, r"prompt_lengths must hold integers.*float32"),
    ("abc", TypeError, r"prompt_lengths must be a sequence of ints or an integer tensor"),
])
def test_bad_prompt_lengths_are_rejected_before_any_work(lengths, error, match):
    model = _model("rotary")
    with pytest.raises(error, match=match):
        model.generate(torch.randint(0, VOCAB, (3, 5)), 2, prompt_lengths=lengths)


def test_sequence_starts_with_a_state_only_on_the_prompt():
    model = _model("rotary")
    ids = torch.randint(0, VOCAB, (2, 4))
    with pytest.raises(ValueError, match=r"sequence_starts\[1\] must be < seq=4 before decoding"):
        model(ids, model.new_state(2), sequence_starts=[0, 4])
    state = model.new_state(2)
    model(ids, state, sequence_starts=[0, 1])
    with pytest.raises(ValueError, match="sequence_starts belongs to the prompt: this cache is at position 4"):
        model(ids[:, :1], state, sequence_starts=[0, 1])


def test_cli_prompts_of_different_lengths_equal_each_prompt_alone(tmp_path):
    model = LongNetLM(vocab_size=256, embed_dim=16, num_heads=2, num_layers=1, segment_lengths=(4, 8),
                      dilation_rates=(1, 2))
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"config": model.config.to_dict(), "model": model.state_dict()})
    common = [path, "--max-new-bytes", "9", "--temperature", "0"]
    both = generate_cli.main(common + ["--prompt", "import os", "--prompt", "x", "--num-samples", "2"])
    alone = [generate_cli.main(common + ["--prompt", p])[0] for p in ("import os", "x")]
    assert both == [alone[0], alone[0], alone[1], alone[1]]
    assert both[0].startswith("import os") and both[2].startswith("x")
