"""LongNet / LongNetLM: MAGNETO layout and init statistics, causality, padding, positions, generate()."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dilated_attention_pytorch.models import LongNet, LongNetLM, LongNetLMConfig, RotaryEmbedding, magneto_gamma
from dilated_attention_pytorch.models.sampling import decode_loop, sample_next_token


def _xavier_std(linear: nn.Linear, gain: float) -> float:
    fan_out, fan_in = linear.weight.shape
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def _assert_std(linear: nn.Linear, gain: float) -> None:
    w = linear.weight.detach().double()
    expected = _xavier_std(linear, gain)
    # sample std of N(0, s^2) with m entries has relative sd ~ 1/sqrt(2m): 6 sigma
    tol = 6 / math.sqrt(2 * w.numel())
    assert abs(w.std().item() / expected - 1) < tol, (w.std().item(), expected)
    assert abs(w.mean().item()) < 6 * expected / math.sqrt(w.numel())


def test_magneto_gamma_formulas():
    assert magneto_gamma("decoder_only", decoder_layers=12) == pytest.approx(math.sqrt(math.log(24)))
    assert magneto_gamma("encoder", encoder_layers=6, decoder_layers=6) == pytest.approx(
        math.sqrt(math.log(18) * math.log(12) / 3))
    assert magneto_gamma("decoder", encoder_layers=6, decoder_layers=6) == pytest.approx(math.sqrt(math.log(18)))
    with pytest.raises(ValueError, match="role"):
        magneto_gamma("middle", decoder_layers=2)


def test_lm_magneto_layout_and_init_statistics():
    torch.manual_seed(0)
    model = LongNetLM(vocab_size=64, embed_dim=256, num_heads=4, num_layers=6, segment_lengths=(16, 32),
                      dilation_rates=(1, 2))
    gamma = math.sqrt(math.log(12))
    assert model.gamma == pytest.approx(gamma)
    for layer in model.layers:
        attn, ffn = layer.self_attn, layer.ffn
        # sub-LayerNorm inside each sublayer, before its output projection; pre-LN around it
        assert isinstance(attn.norm, nn.LayerNorm) and attn.norm.normalized_shape == (256,)
        assert isinstance(ffn.norm, nn.LayerNorm) and ffn.norm.normalized_shape == (1024,)
        assert isinstance(layer.self_attn_norm, nn.LayerNorm) and isinstance(layer.ffn_norm, nn.LayerNorm)
        for proj, gain in ((attn.q_proj, 1.0), (attn.k_proj, 1.0), (attn.v_proj, gamma), (attn.out_proj, gamma),
                           (ffn.fc1, gamma), (ffn.fc2, gamma)):
            _assert_std(proj, gain)
            assert torch.count_nonzero(proj.bias) == 0
    assert model.embed.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)


def test_longnet_encoder_decoder_gammas():
    torch.manual_seed(0)
    model = LongNet(vocab_size=32, embed_dim=256, num_heads=4, encoder_layers=3, decoder_layers=5,
                    segment_lengths=(8,), dilation_rates=(1,))
    ge, gd = math.sqrt(math.log(15) * math.log(6) / 3), math.sqrt(math.log(15))
    for layer in model.encoder:
        _assert_std(layer.self_attn.v_proj, ge)
        _assert_std(layer.ffn.fc2, ge)
        _assert_std(layer.self_attn.q_proj, 1.0)
        assert layer.cross_attn is None
    for layer in model.decoder:
        _assert_std(layer.self_attn.out_proj, gd)
        _assert_std(layer.cross_attn.v_proj, gd)
        _assert_std(layer.cross_attn.k_proj, 1.0)
        _assert_std(layer.ffn.fc1, gd)


def test_lm_is_causal_and_trains():
    torch.manual_seed(0)
    model = LongNetLM(vocab_size=50, embed_dim=32, num_heads=4, num_layers=2, segment_lengths=(4, 8, 16),
                      dilation_rates=(1, 2, 4)).double()
    ids = torch.randint(0, 50, (2, 30))
    logits = model(ids)
    assert logits.shape == (2, 30, 50) and torch.isfinite(logits).all()
    changed = ids.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 50
    torch.testing.assert_close(model(changed)[:, :20], logits[:, :20], rtol=0, atol=1e-12)
    assert not torch.allclose(model(changed)[:, 20:], logits[:, 20:])
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_longnet_source_padding_is_ignored():
    torch.manual_seed(0)
    model = LongNet(vocab_size=30, embed_dim=32, num_heads=4, encoder_layers=2, decoder_layers=1,
                    segment_lengths=(4, 8), dilation_rates=(1, 2)).double().eval()
    src = torch.randint(0, 30, (1, 12))
    pad = torch.zeros(1, 12, dtype=torch.bool)
    pad[:, 9:] = True
    tgt = torch.randint(0, 30, (1, 7))
    other = src.clone()
    other[:, 9:] = (other[:, 9:] + 5) % 30
    torch.testing.assert_close(model(src, tgt, pad), model(other, tgt, pad), rtol=0, atol=1e-12)


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="embed_dim"):
        LongNetLMConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="positions"):
        LongNetLMConfig(positions="alibi")
    with pytest.raises(ValueError, match="attention_type"):
        LongNetLMConfig(attention_type="ring")
    with pytest.raises(ValueError, match="dilation_rates"):
        LongNetLMConfig(segment_lengths=(4,), dilation_rates=(8,))
    with pytest.raises(TypeError, match="num_layers"):
        LongNetLMConfig(num_layers=2.0)
    with pytest.raises(TypeError, match="either a config"):
        LongNetLM(LongNetLMConfig(), embed_dim=64)
    cfg = LongNetLMConfig(num_layers=1, offsets=[[0, 1, 0, 1], [0, 0, 0, 0]], segment_lengths=(4, 8),
                          dilation_rates=(2, 1))
    assert LongNetLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError, match="unknown field"):
        LongNetLMConfig.from_dict({"layers": 3})


@pytest.mark.parametrize("kind", ["rotary", "xpos"])
def test_positions_depend_only_on_relative_distance(kind):
    rope = RotaryEmbedding(16, kind=kind)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64).expand(1, 40, 1, 16)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64).expand(1, 40, 1, 16)
    rq, rk = rope(q, k)
    scores = torch.einsum("bthd,buhd->tu", rq, rk)
    for delta in (0, 3, 11):
        diag = torch.diagonal(scores, offset=-delta)  # scores[t, t - delta]
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-9, atol=1e-9)
    rq2, rk2 = rope(q[:, :5], k[:, :5], start=35)  # continuing at an offset equals the slice
    torch.testing.assert_close(rq2, rq[:, 35:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rk2, rk[:, 35:], rtol=1e-12, atol=1e-12)
    if kind == "rotary":
        torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))


def test_xpos_refuses_positions_it_cannot_represent():
    rope = RotaryEmbedding(8, kind="xpos", xpos_scale_base=4)
    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match="max_position"):
        rope(q, q, start=int(rope.max_position))


# -- generate --------------------------------------------------------------------------------------
def _lm(**kw):
    torch.manual_seed(0)
    return LongNetLM(vocab_size=20, embed_dim=32, num_heads=4, num_layers=2, segment_lengths=(4, 8),
                     dilation_rates=(1, 2), **kw).double()


def test_greedy_generate_equals_argmax_of_full_passes():
    model = _lm().eval()
    prompt = torch.randint(0, 20, (3, 5))
    out = model.generate(prompt, 15, temperature=0)
    ids = prompt
    for _ in range(15):  # no cache: recompute everything each step
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_batched_generate_equals_one_by_one_and_restores_training_mode():
    model = _lm(dropout=0.5)
    model.train()
    prompt = torch.randint(0, 20, (3, 4))
    out = model.generate(prompt, 10, temperature=0)
    assert model.training
    for i in range(3):
        assert torch.equal(model.generate(prompt[i : i + 1], 10, temperature=0), out[i : i + 1])


def test_generate_stops_at_the_stop_token_and_pads():
    model = _lm().eval()
    prompt = torch.randint(0, 20, (4, 3))
    free = model.generate(prompt, 12, temperature=0)
    stop = int(free[0, 3 + 2])  # the third token sequence 0 generates
    out = model.generate(prompt, 12, temperature=0, stop_token=stop, pad_token=19 if stop != 19 else 18)
    pad = 19 if stop != 19 else 18
    for row, ref in zip(out, free):
        gen, ref_gen = row[3:].tolist(), ref[3:].tolist()
        if stop in ref_gen[: len(gen)]:
            cut = ref_gen.index(stop) + 1
            assert gen[:cut] == ref_gen[:cut]
            assert all(t == pad for t in gen[cut:])
        else:
            assert gen == ref_gen[: len(gen)]
    assert out.shape[1] <= 15


def test_generate_ends_early_when_every_sequence_stopped():
    model = _lm().eval()
    prompt = torch.randint(0, 20, (1, 3))
    first = int(model.generate(prompt, 1, temperature=0)[0, -1])
    out = model.generate(prompt, 50, temperature=0, stop_token=first)
    assert out.shape == (1, 4)


def test_top_k_samples_only_from_the_k_best():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, -3.0, 3.9]]).expand(400, 6)
    gen = torch.Generator().manual_seed(0)
    tokens = sample_next_token(logits, temperature=2.0, top_k=3, generator=gen)
    assert set(tokens.tolist()) == {1, 3, 5}
    assert torch.equal(sample_next_token(logits, top_k=1, generator=gen), torch.ones(400, dtype=torch.long))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(500, 4)
    tokens = sample_next_token(logits, top_p=0.75, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}
    tokens = sample_next_token(logits, top_p=0.81, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1, 2}


def test_sampling_is_reproducible_with_a_generator():
    model = _lm().eval()
    prompt = torch.randint(0, 20, (2, 3))
    a = model.generate(prompt, 10, top_k=5, top_p=0.9, temperature=1.3, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 10, top_k=5, top_p=0.9, temperature=1.3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_decode_loop_with_scripted_logits():
    script = iter([2, 7, 7, 1, 4])
    one_hot = lambda t: nn.functional.one_hot(torch.tensor([t, 3]), 8).double() * 50  # noqa: E731
    out = decode_loop(lambda tok: one_hot(next(script)), one_hot(5), torch.zeros(2, 1, dtype=torch.long), 6,
                      temperature=0, top_k=None, top_p=None, stop_token=7, pad_token=0, generator=None)
    # row 0: 5, 2, 7 (stop), then pad; row 1 always 3; ends after max_new_tokens
    assert out.tolist() == [[0, 5, 2, 7, 0, 0, 0], [0, 3, 3, 3, 3, 3, 3]]


def test_generate_argument_errors():
    model = _lm().eval()
    prompt = torch.randint(0, 20, (1, 3))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 2, top_p=1.5)
    with pytest.raises(ValueError, match="stop_token"):
        model.generate(prompt, 2, stop_token=20)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.tensor([[1, 25]]), 2)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.tensor([1, 2]), 2)
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_longnet_generate_runs_batched():
    torch.manual_seed(0)
    model = LongNet(vocab_size=16, embed_dim=32, num_heads=4, encoder_layers=1, decoder_layers=2,
                    segment_lengths=(4, 8), dilation_rates=(1, 2)).double()
    src = torch.randint(0, 16, (2, 11))
    start = torch.zeros(2, 1, dtype=torch.long)
    out = model.generate(src, start, 9, temperature=0)
    ids = start
    for _ in range(9):
        ids = torch.cat([ids, model(src, ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
