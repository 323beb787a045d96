"""Adversarial inputs (issue 13, items 4 and 7): each gets a clear ValueError/TypeError naming the argument,
or, where the SPEC gives it a meaning (a segment, dilation or block longer than the sequence), just works."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.tensors import rand_qkv
from dilated_attention_pytorch import (
    BlockSparseRingMultiheadDilatedAttention,
    DilatedAttention,
    ImprovedDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    LongNet,
    LongNetLM,
    LongNetLMConfig,
    MultiheadDilatedAttention,
    block_sparse_attention,
    dilated_attention,
    explain_backend,
)
from dilated_attention_pytorch.block_sparse import SparsePatternConfig, dilated_layout
from dilated_attention_pytorch.models import LongNetConfig
from dilated_attention_pytorch.reference import reference_dilated_attention

HUGE = [2**62, 2**63, 10**30]  # beyond what torch can index (or hold at all)


# -- item 4: head_groups with more patterns than heads ---------------------------------------------------
HEAD_GROUP_ENTRY_POINTS = {
    "functional": lambda: dilated_attention(*rand_qkv(1, 8, 2, 2, 4), [2, 4, 8], [1, 2, 4], head_groups=True),
    "module forward": lambda: DilatedAttention([2, 4, 8], [1, 2, 4], head_groups=True)(*rand_qkv(1, 8, 2, 2, 4)),
    "multihead": lambda: MultiheadDilatedAttention(8, 2, segment_lengths=[2, 4, 8], dilation_rates=[1, 2, 4],
                                                   head_groups=True),
    "improved multihead": lambda: ImprovedMultiheadDilatedAttention(
        8, 2, segment_lengths=[2, 4, 8], dilation_rates=[1, 2, 4], head_groups=True),
    "model config": lambda: LongNetLMConfig(embed_dim=8, num_heads=2, segment_lengths=[2, 4, 8],
                                            dilation_rates=[1, 2, 4], head_groups=True),
    "block layout": lambda: dilated_layout(8, 2, [2, 4, 8], [1, 2, 4], head_groups=True),
    "block-sparse config": lambda: SparsePatternConfig(
        "dilated", segment_lengths=[2, 4, 8], dilation_rates=[1, 2, 4], head_groups=True).build(8, 2, 1),
}


@pytest.mark.parametrize("entry", list(HEAD_GROUP_ENTRY_POINTS))
def test_head_groups_with_fewer_heads_than_patterns_is_an_error(entry):
    """2 heads, 3 patterns: a group per pattern would leave pattern 2 without heads (it was dropped silently)."""
    rule = r"head_groups=True .*at least one head per pattern.*num_heads=2 for 3 patterns"
    with pytest.raises(ValueError, match=rule):
        HEAD_GROUP_ENTRY_POINTS[entry]()


# -- item 7: sizes beyond the sequence ------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [10**6, 2**62, 10**30])
def test_block_size_beyond_the_sequence_is_one_block_and_fast(block_size):
    """layout (1, 1, 1) is valid for any block_size >= n; the work is bounded by n, not block_size**2."""
    q, k, v = rand_qkv(2, 16, 2, 2, 8)
    layout = torch.ones(1, 1, 1, dtype=torch.bool)
    out, lse = block_sparse_attention(q, k, v, layout, block_size=block_size, is_causal=True, return_lse=True)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    scores = (qt @ kt.transpose(-1, -2)) * 8**-0.5 + torch.ones(16, 16).tril().log()
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend,huge", [("portable", w) for w in HUGE] + [("reference", w) for w in HUGE[1:]])
def test_segments_and_dilations_beyond_int64_follow_w_min_n(backend, huge):
    """W = min(w, n): a huge segment is the whole sequence; a dilation r >= W leaves one row per offset,
    exactly the pattern (W, W). No size reaches torch unclamped."""
    n, h = 13, 3
    q, k, v = rand_qkv(2, n, h, h, 4)
    for ws, rs, same in (([huge], [1], ([n], [1])), ([huge, 4], [huge - 1, 2], ([n, 4], [n, 2]))):
        out, lse = dilated_attention(q, k, v, ws, rs, is_causal=True, return_lse=True, backend=backend)
        ref, ref_lse = reference_dilated_attention(q, k, v, *same, is_causal=True)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
        out.sum().backward()  # gradients run too
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # an explicit offset beyond the segment covers no row (and exceeds int64 here): head 0 sees nothing
    out = dilated_attention(q, k, v, [huge], [huge], offsets=[[huge - 1, 0, 5]], backend=backend)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    ref, _ = reference_dilated_attention(q, k, v, [n], [n], offsets=[[0, 0, 5]])
    torch.testing.assert_close(out[:, :, 1:], ref[:, :, 1:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("huge", HUGE)
def test_huge_segments_in_modules_layouts_and_decoding(huge):
    q, k, v = rand_qkv(1, 10, 2, 2, 4, requires_grad=False)
    ref, _ = reference_dilated_attention(q, k, v, [10], [1])
    for module in (DilatedAttention([huge], [1]), ImprovedDilatedAttention([huge], [huge])):
        r = module.dilation_rates[0]
        expected = ref if r == 1 else reference_dilated_attention(q, k, v, [10], [10])[0]
        torch.testing.assert_close(module(q, k, v), expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(dilated_layout(5, 2, [huge], [huge]), dilated_layout(5, 2, [5], [5]))
    # the decoding cache holds what the text needs, not ceil(w / r) keys
    torch.manual_seed(0)
    model = LongNetLM(vocab_size=11, embed_dim=8, num_heads=2, num_layers=1, segment_lengths=[huge, 4],
                      dilation_rates=[1, 2]).double().eval()
    ids = torch.randint(0, 11, (2, 9))
    full = model(ids)
    state = model.new_state(2)
    steps = [model(ids[:, :5], state)] + [model(ids[:, t : t + 1], state) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    assert state.numel() <= 2 * 2 * 2 * 4 * (16 + 2)  # (k, v) x batch x heads x head_dim x keys
    out = model.generate(ids[:, :3], 4, temperature=0)
    assert out.shape == (2, 7)


# -- item 7: token ids ----------------------------------------------------------------------------------
def _lm():
    return LongNetLM(vocab_size=20, embed_dim=8, num_heads=2, num_layers=1, segment_lengths=[4], dilation_rates=[1])


BAD_IDS = [
    (torch.tensor([1, 2, 3]), ValueError, r"input_ids must have shape \(batch, seq\), but got shape \(3,\)"),
    (torch.rand(1, 3), TypeError, r"input_ids must be an integer tensor.*torch.float32"),
    (torch.tensor([[1, 20]]), ValueError, r"input_ids must lie in \[0, vocab_size=20\).*\[1, 20\]"),
    (torch.tensor([[-1, 2]]), ValueError, r"input_ids must lie in \[0, vocab_size=20\).*\[-1, 2\]"),
    ([[1, 2]], TypeError, r"input_ids must be a torch.Tensor"),
]


@pytest.mark.parametrize("ids,error,match", BAD_IDS, ids=[m[:30] for _, _, m in BAD_IDS])
def test_lm_forward_validates_ids(ids, error, match):
    with pytest.raises(error, match=match):
        _lm()(ids)


def test_longnet_forward_validates_ids():
    model = LongNet(vocab_size=20, embed_dim=8, num_heads=2, encoder_layers=1, decoder_layers=1,
                    segment_lengths=[4], dilation_rates=[1])
    good = torch.randint(0, 20, (2, 5))
    with pytest.raises(ValueError, match=r"tgt_ids must lie in \[0, vocab_size=20\)"):
        model(good, torch.tensor([[3, 25]] * 2))
    with pytest.raises(ValueError, match=r"src_ids must have shape \(batch, seq\)"):
        model(good[0], good)
    with pytest.raises(ValueError, match="one batch size"):
        model(good, good[:1])
    assert model(good, good).shape == (2, 5, 20)


# -- item 7: sampling arguments -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(top_k="3"), TypeError, "top_k"),
    (dict(stop_token=3.0), TypeError, "stop_token"),
    (dict(pad_token=np.int64(20)), ValueError, r"pad_token must be None or a token id in \[0, vocab_size=20\)"),
])
def test_generate_checks_sampling_arguments_up_front(kwargs, error, match):
    model = _lm()
    args = {"max_new_tokens": 0, **kwargs}  # nothing to generate: still checked
    with pytest.raises(error, match=match):
        model.generate(torch.randint(0, 20, (1, 3)), **args)


def test_longnet_generate_checks_tokens():
    model = LongNet(vocab_size=20, embed_dim=8, num_heads=2, encoder_layers=1, decoder_layers=1,
                    segment_lengths=[4], dilation_rates=[1])
    src, start = torch.randint(0, 20, (1, 5)), torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="stop_token"):
        model.generate(src, start, 3, stop_token=25)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(src, start, 3, temperature=float("nan"))


@pytest.mark.parametrize("scalar", [np.int64, np.int32, torch.tensor])
def test_generate_takes_numpy_and_torch_integer_scalars(scalar):
    torch.manual_seed(0)
    model = _lm().eval()
    prompt = torch.randint(0, 20, (2, 3))
    plain = model.generate(prompt, 5, temperature=0, stop_token=int(prompt[0, -1]), top_k=3)
    out = model.generate(prompt, scalar(5), temperature=scalar(0), stop_token=scalar(int(prompt[0, -1])),
                         top_k=scalar(3), pad_token=scalar(int(prompt[0, -1])))
    assert torch.equal(out, plain)


# -- item 7: module constructor numbers -----------------------------------------------------------------
def _mha(cls, **kw):
    return lambda: cls(16, 2, segment_lengths=[4], dilation_rates=[1], **kw)


CONSTRUCTORS = {
    "MultiheadDilatedAttention": lambda **kw: _mha(MultiheadDilatedAttention, **kw)(),
    "ImprovedMultiheadDilatedAttention": lambda **kw: _mha(ImprovedMultiheadDilatedAttention, **kw)(),
    "BlockSparseRingMultiheadDilatedAttention": lambda **kw: _mha(BlockSparseRingMultiheadDilatedAttention, **kw)(),
}


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
@pytest.mark.parametrize("kwargs,error", [
    (dict(gamma_init="x"), TypeError), (dict(gamma_init=float("nan")), ValueError),
    (dict(gamma_init=float("inf")), ValueError), (dict(gamma_init=-1.0), ValueError),
    (dict(layer_norm_eps=-1), ValueError), (dict(layer_norm_eps="x"), TypeError),
    (dict(layer_norm_eps=float("nan")), ValueError),
])
def test_module_constructors_reject_bad_gamma_and_eps(name, kwargs, error):
    (arg, value), = kwargs.items()
    with pytest.raises(error, match=arg):
        CONSTRUCTORS[name](**kwargs)


@pytest.mark.parametrize("config", [LongNetLMConfig, LongNetConfig])
@pytest.mark.parametrize("value,error", [(-1, ValueError), ("x", TypeError), (float("nan"), ValueError),
                                         (0.0, ValueError)])
def test_model_configs_reject_bad_layer_norm_eps(config, value, error):
    with pytest.raises(error, match="layer_norm_eps"):
        config(layer_norm_eps=value)


# -- item 7: explain_backend -----------------------------------------------------------------------------
def test_explain_backend_checks_like_dilated_attention():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"backend must be one of .*'warp-speed'"):
        explain_backend(q, backend="warp-speed")
    with pytest.raises(ValueError, match=r"query must have shape \(batch, seq, heads, head_dim\)"):
        explain_backend(q[0])
    with pytest.raises(TypeError, match="key_padding_mask must have dtype torch.bool"):
        explain_backend(q, key_padding_mask=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="dropout_p"):
        explain_backend(q, dropout_p=2.0)
    assert explain_backend(q).backend == "portable"


# -- item 7: sparse, nested and mixed-dtype tensors ------------------------------------------------------
def test_sparse_tensors_get_a_clear_error():
    q, k, v = rand_qkv(1, 8, 2, 2, 4, requires_grad=False)
    with pytest.raises(TypeError, match=r"key must be a dense \(torch.strided\) tensor, but got a torch.sparse_coo"):
        dilated_attention(q, k.to_sparse(), v, [4], [1])
    with pytest.raises(TypeError, match="key_padding_mask must be a dense"):
        dilated_attention(q, k, v, [4], [1], key_padding_mask=torch.zeros(1, 8, dtype=torch.bool).to_sparse())
    with pytest.raises(TypeError, match="query must be a dense"):
        block_sparse_attention(q.to_sparse(), k, v, torch.ones(1, 2, 2, dtype=torch.bool), block_size=4)
    with pytest.raises(TypeError, match="layout must be a dense"):
        block_sparse_attention(q, k, v, torch.ones(1, 2, 2, dtype=torch.bool).to_sparse(), block_size=4)
    x = torch.randn(1, 8, 16)
    with pytest.raises(TypeError, match="value must be a dense"):
        MultiheadDilatedAttention(16, 2, segment_lengths=[4], dilation_rates=[1])(x, x, x.to_sparse())


@pytest.mark.parametrize("cls", [MultiheadDilatedAttention, ImprovedMultiheadDilatedAttention,
                                 BlockSparseRingMultiheadDilatedAttention])
def test_multihead_dtype_mismatch_gets_our_error(cls):
    extra = {"block_size": 4} if cls is BlockSparseRingMultiheadDilatedAttention else {}
    m = cls(16, 2, segment_lengths=[4], dilation_rates=[1], **extra)
    x = torch.randn(2, 8, 16)
    with pytest.raises(TypeError, match=r"query, key, value must have one dtype, but got torch.float32, torch.float64"):
        m(x, x.double(), x)
    with pytest.raises(TypeError, match=r"query has dtype torch.float64, but this module's parameters are torch.float"):
        m(x.double(), x.double(), x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: inputs may differ from the parameters
        out, _ = m(x.bfloat16(), x.bfloat16(), x.bfloat16())
    assert out.shape == x.shape
