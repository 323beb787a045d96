"""Bad input gets a clear ValueError/TypeError that names the argument."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import DilatedAttention, DilatedAttentionConfig, MultiheadDilatedAttention, dilated_attention

Q = torch.randn(1, 16, 4, 8)
K = torch.randn(1, 16, 2, 8)

BAD_CALLS = [
    # (kwargs overriding a good call, exception, words the message must contain)
    (dict(segment_lengths=[8, 16], dilation_rates=[1]), ValueError, "same length"),
    (dict(segment_lengths=[], dilation_rates=[]), ValueError, "segment_lengths must not be empty"),
    (dict(segment_lengths=[0], dilation_rates=[1]), ValueError, "segment_lengths[0]"),
    (dict(segment_lengths=[8], dilation_rates=[-1]), ValueError, "dilation_rates[0]"),
    (dict(segment_lengths=[8.0], dilation_rates=[1]), TypeError, "segment_lengths[0]"),
    (dict(segment_lengths=[4], dilation_rates=[8]), ValueError, "dilation_rates[0] must be <= segment_lengths[0]"),
    (dict(segment_lengths="8", dilation_rates=[1]), TypeError, "segment_lengths"),
    (dict(offsets="diagonal"), ValueError, "offsets"),
    (dict(offsets=[[0, 1, 2, 0]]), ValueError, "offsets[0][2]"),
    (dict(offsets=[[0, 1, 1]]), ValueError, "offsets[0]"),
    (dict(offsets=[[0, 1, 0, 1], [0]]), ValueError, "one list per pattern"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(scale="big"), TypeError, "scale"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(is_causal=1), TypeError, "is_causal"),
    (dict(head_groups="yes"), TypeError, "head_groups"),
    (dict(return_lse=None), TypeError, "return_lse"),
    (dict(backend="flash"), ValueError, "backend"),
    (dict(key_padding_mask=torch.zeros(1, 16)), TypeError, "key_padding_mask"),
    (dict(key_padding_mask=torch.zeros(1, 15, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(query=torch.randn(16, 4, 8)), ValueError, "query"),
    (dict(query=torch.randn(1, 16, 3, 8)), ValueError, "multiple of key/value heads"),
    (dict(query=torch.randn(1, 17, 4, 8)), ValueError, "same sequence length"),
    (dict(query=torch.randn(1, 16, 4, 8, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(query=torch.ones(1, 16, 4, 8, dtype=torch.long)), TypeError, "floating-point"),
    (dict(value=torch.randn(1, 16, 1, 8)), ValueError, "same shape"),
    (dict(query=torch.randn(1, 0, 4, 8), key=torch.randn(1, 0, 2, 8), value=torch.randn(1, 0, 2, 8)), ValueError, "seq"),
    (dict(query="q"), TypeError, "query"),
]


@pytest.mark.parametrize("override,exc,words", BAD_CALLS)
def test_bad_calls_raise_clear_errors(override, exc, words):
    call = dict(query=Q, key=K, value=K, segment_lengths=[8], dilation_rates=[2])
    call.update(override)
    with pytest.raises(exc) as info:
        dilated_attention(**call)
    assert words in str(info.value)


def test_reference_backend_refuses_large_inputs_and_dropout():
    with pytest.raises(ValueError, match="reference"):
        dilated_attention(Q, K, K, [8], [1], backend="reference", dropout_p=0.1)
    big = torch.randn(1, 20000, 1, 2)
    with pytest.raises(ValueError, match="b\\*h\\*n\\*n"):
        dilated_attention(big, big, big, [8], [1], backend="reference")


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(segment_lengths=[8], dilation_rates=[16]), ValueError, "dilation_rates[0]"),
        (dict(segment_lengths=[8], dilation_rates=[1], attention_dropout=-0.1), ValueError, "dropout"),
        (dict(segment_lengths=[8], dilation_rates=[1], softmax_scale=-1.0), ValueError, "softmax_scale"),
        (dict(segment_lengths=[8], dilation_rates=[1], backend="cuda"), ValueError, "backend"),
    ],
)
def test_module_and_config_validate_at_construction(kwargs, exc, words):
    with pytest.raises(exc, match=None) as info:
        DilatedAttention(**kwargs)
    assert words in str(info.value)
    with pytest.raises(TypeError):
        DilatedAttentionConfig([8], [1], unknown=1)


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(embed_dim=30, num_heads=4), ValueError, "divisible"),
        (dict(embed_dim=32, num_heads=4, num_kv_heads=3), ValueError, "num_kv_heads"),
        (dict(embed_dim=32, num_heads=0), ValueError, "num_heads"),
        (dict(embed_dim=32, num_heads=4, offsets=[[0, 1, 0]]), ValueError, "offsets[0]"),
    ],
)
def test_multihead_validates_at_construction(kwargs, exc, words):
    with pytest.raises(exc) as info:
        MultiheadDilatedAttention(segment_lengths=[8], dilation_rates=[2], **kwargs)
    assert words in str(info.value)


def test_a_call_is_checked_once(monkeypatch):
    """Public functions and modules check their arguments once, then run internal functions on the
    checked settings (a frozen ``AttentionArgs``)."""
    from dilated_attention_pytorch import _validation as V
    from dilated_attention_pytorch.functional import AttentionArgs, attend, attention_args

    calls = []
    check_qkv = V.check_qkv
    monkeypatch.setattr(V, "check_qkv", lambda *a: calls.append(a) or check_qkv(*a))
    out = DilatedAttention([8], [2])(Q, K, K)
    assert len(calls) == 1
    args = attention_args(Q, K, K, [8], [2], is_causal=False, scale=None, dropout_p=0.0, offsets=[[0, 1, 0, 1]],
                          head_groups=False, key_padding_mask=None, return_lse=False, backend="auto")
    assert isinstance(args, AttentionArgs) and args.scale == 8**-0.5 and args.offsets == ((0, 1, 0, 1),)
    hash(args)  # hashable settings
    torch.testing.assert_close(attend(Q, K, K, None, args)[0], out)
