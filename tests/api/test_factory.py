"""The factory: every named route builds and runs (checked against single-device ``dilated_attention`` and the
float64 reference), ``"auto"`` decides from the environment and says why, bad arguments raise clearly."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import DilatedAttention, MultiheadDilatedAttention, dilated_attention
from dilated_attention_pytorch.factory import (
    ATTENTION_TYPES,
    attention_class,
    create_block_sparse_attention,
    create_dilated_attention,
    create_multihead_dilated_attention,
    explain_auto,
    route_status,
)
from dilated_attention_pytorch.reference import reference_dilated_attention

from tests.helpers.tensors import DEVICES
from tests.helpers.distributed import run_distributed

WS, RS = (4, 8), (1, 2)
TOL = dict(rtol=1e-10, atol=1e-10)


def _qkv(b=2, n=19, h=4, h_kv=2, d=8, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return tuple(torch.randn(b, n, hh, d, dtype=torch.float64, generator=g) for hh in (h, h_kv, h_kv))


@pytest.mark.parametrize("attention_type", ["standard", "improved", "auto"])
@pytest.mark.parametrize("causal", [False, True])
def test_single_device_routes_equal_reference(attention_type, causal):
    q, k, v = (t.requires_grad_() for t in _qkv())
    module = create_dilated_attention(attention_type, segment_lengths=WS, dilation_rates=RS, offsets="torchscale")
    out = module(q, k, v, is_causal=causal)
    ref, _ = reference_dilated_attention(q, k, v, WS, RS, is_causal=causal, offsets="torchscale")
    torch.testing.assert_close(out, ref, **TOL)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL)


def _single_device_twin(module, **kwargs):
    """A MultiheadDilatedAttention with ``module``'s weights (fused q/k/v forms convert via to_multihead())."""
    if hasattr(module, "to_multihead"):
        twin = module.to_multihead()
    else:
        twin = MultiheadDilatedAttention(dtype=torch.float64, **kwargs)
        twin.load_state_dict(module.state_dict())
    assert type(twin) is MultiheadDilatedAttention
    return twin


@pytest.mark.parametrize("attention_type", ["standard", "improved", "auto"])
def test_single_device_multihead_routes(attention_type):
    torch.manual_seed(0)
    module = create_multihead_dilated_attention(
        attention_type, embed_dim=32, num_heads=4, segment_lengths=WS, dilation_rates=RS, num_kv_heads=2,
        dtype=torch.float64,
    )
    base = _single_device_twin(module, embed_dim=32, num_heads=4, segment_lengths=WS, dilation_rates=RS,
                               num_kv_heads=2)
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    out, _ = module(x, x, x, is_causal=True)
    torch.testing.assert_close(out, base(x, x, x, is_causal=True)[0], **TOL)


def test_block_sparse_route_builds_and_runs():
    q, k, v = _qkv(n=32, h=2, h_kv=2)
    module = create_dilated_attention("block_sparse", segment_lengths=(8, 16), dilation_rates=(1, 2), block_size=4)
    assert type(module) is attention_class("block_sparse")
    direct = attention_class("block_sparse")(segment_lengths=(8, 16), dilation_rates=(1, 2), block_size=4)
    out = module(q, k, v, is_causal=True)
    assert out.shape == q.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, direct(q, k, v, is_causal=True), **TOL)
    mh = create_multihead_dilated_attention("block_sparse", embed_dim=16, num_heads=2, segment_lengths=(8, 16),
                                            dilation_rates=(1, 2), block_size=4)
    assert type(mh) is attention_class("block_sparse", multihead=True)
    x = torch.randn(1, 32, 16)
    assert mh(x, x, x)[0].shape == x.shape
    same = create_block_sparse_attention(segment_lengths=(8, 16), dilation_rates=(1, 2), block_size=4)
    assert type(same) is type(module)


def test_auto_without_process_group_or_gpu_is_standard_and_says_why():
    choice = explain_auto(device="cpu")
    assert choice.attention_type == "standard"
    assert any("process group" in r for r in choice.reasons)
    assert any("cpu" in r for r in choice.reasons)
    assert "auto -> standard" in str(choice)
    if not torch.cuda.is_available():
        assert type(create_dilated_attention("auto", WS, RS)) is DilatedAttention
        assert explain_auto().attention_type == "standard"


@pytest.mark.parametrize("device", DEVICES)
def test_auto_uses_the_fused_kernel_only_when_it_supports_the_inputs(device):
    bf16 = explain_auto(device=device, dtype=torch.bfloat16, head_dim=64)
    fp32 = explain_auto(device=device, dtype=torch.float32, head_dim=64)
    mh = create_multihead_dilated_attention("auto", embed_dim=64, num_heads=1, segment_lengths=WS,
                                            dilation_rates=RS, dtype=torch.bfloat16, device=device)
    if device == "cpu":
        assert bf16.attention_type == fp32.attention_type == "standard"
        assert type(mh) is MultiheadDilatedAttention
    else:
        assert bf16.attention_type == "improved", bf16
        assert fp32.attention_type == "standard" and any("float16 or bfloat16" in r for r in fp32.reasons)
        assert type(mh) is attention_class("improved", multihead=True)


def test_unknown_keyword_lists_the_accepted_ones():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['segment_length'\].*accepted: "
                                        r"\['segment_lengths', 'dilation_rates'"):
        create_dilated_attention("standard", segment_length=WS, dilation_rates=RS)
    with pytest.raises(TypeError, match="process_group"):  # standard has no process group
        create_dilated_attention("standard", WS, RS, process_group=None)
    with pytest.raises(TypeError, match=r"\['softmax_temperature'\].*accepted: \['embed_dim', 'num_heads'"):
        create_multihead_dilated_attention("standard", embed_dim=8, num_heads=2, segment_lengths=WS,
                                           dilation_rates=RS, softmax_temperature=2.0)
    for kind in ("ring", "distributed"):  # multihead classes forward **kwargs: still checked against the base
        with pytest.raises(TypeError, match="bogus.*accepted: .*'process_group'.*'segment_lengths'"):
            create_multihead_dilated_attention(kind, embed_dim=8, num_heads=2, segment_lengths=WS,
                                               dilation_rates=RS, bogus=1)
    with pytest.raises(TypeError, match="missing a required argument: 'dilation_rates'"):
        create_dilated_attention("standard", segment_lengths=WS)


def test_bad_attention_type():
    with pytest.raises(ValueError, match=r"attention_type must be one of .*'standard'.*but got 'fast'"):
        create_dilated_attention("fast", WS, RS)
    with pytest.raises(ValueError, match="concrete"):
        attention_class("auto")
    assert set(ATTENTION_TYPES) == {"auto", "standard", "improved", "ring", "distributed", "block_sparse"}
    status = route_status()
    assert set(status) == set(ATTENTION_TYPES) - {"auto"}
    assert all(ok for ok, _ in status.values()), status


# -- routes that need a process group: real gloo, two ranks ----------------------------------------
def _check_parallel_routes(rank: int, world: int) -> None:
    import torch.distributed as dist

    # An initialised process group alone never means sequence parallelism (issue 13): auto stays single-device.
    single = "improved" if torch.cuda.is_available() else "standard"
    choice = explain_auto()
    assert choice.attention_type == single, choice
    assert any(f"process group of {world} ranks is initialised, but auto never turns on sequence parallelism" in r
               for r in choice.reasons), choice
    assert explain_auto(single_device=True).attention_type == single
    from dilated_attention_pytorch.models import LongNetLM  # whole sequences: auto never means ring

    lm = LongNetLM(vocab_size=8, embed_dim=8, num_heads=2, num_layers=1, segment_lengths=(4,), dilation_rates=(1,),
                   attention_type="auto")
    assert lm.layers[0].self_attn.attention_type == single
    # Sequence parallelism asked for: by name, or by passing a process group to "auto" (-> ring over it).
    group = dist.new_group(list(range(world)))
    assert explain_auto(process_group=group).attention_type == "ring"
    with pytest.raises(ValueError, match="contradict"):
        explain_auto(process_group=group, single_device=True)
    with pytest.raises(ValueError, match="process_group=None is ambiguous"):
        create_dilated_attention("auto", (4, 16), (1, 2), process_group=None)
    q, k, v = _qkv(b=1, n=10 * world, h=4, h_kv=2, seed=5)
    sl = slice(rank * 10, (rank + 1) * 10)
    routes = (("ring", {}), ("distributed", {}), ("auto", {"process_group": group}))
    for causal in (False, True):
        whole = dilated_attention(q, k, v, (4, 16), (1, 2), is_causal=causal)
        for kind, extra in routes:
            module = create_dilated_attention(kind, (4, 16), (1, 2), **extra)
            assert type(module) is attention_class("ring" if kind == "auto" else kind)
            out = module(q[:, sl], k[:, sl], v[:, sl], is_causal=causal)
            torch.testing.assert_close(out, whole[:, sl], **TOL)
    x = torch.randn(2, 10 * world, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kw = dict(embed_dim=16, num_heads=4, segment_lengths=(4, 16), dilation_rates=(1, 2))
    for kind, extra in routes:
        torch.manual_seed(3)  # same weights on every rank
        module = create_multihead_dilated_attention(kind, dtype=torch.float64, **kw, **extra)
        assert type(module) is attention_class("ring" if kind == "auto" else kind, multihead=True)
        ref = _single_device_twin(module, **kw)(x, x, x, is_causal=True)[0]
        out = module(x[:, sl], x[:, sl], x[:, sl], is_causal=True)[0]
        torch.testing.assert_close(out, ref[:, sl], **TOL)


def test_ring_and_distributed_routes_and_auto_on_a_process_group():
    run_distributed(_check_parallel_routes, 2, timeout_s=150)
