"""The fixed-shape decode cache: every step equals the row of the full causal pass (float64 dense reference) on
the torch path, across segment boundaries of every pattern and past the largest segment, with left-padded rows,
GQA, head groups and every offset rule; the Triton kernels (Triton's interpreter on the CPU) give the torch
path's outputs and stores; a non-finite value or key reaches only the heads that see it; the size never changes."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from dilated_attention_pytorch.models import LongNetLM, StaticDilatedKVCache
from dilated_attention_pytorch.reference import reference_dilated_attention

from tests.models.test_decoding import CASES

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: Triton's interpreter (tests/conftest.py)


def _cache(case, b, d, max_length, *, backend="torch", dtype=torch.float64, device="cpu", block_k=16, tiles=1):
    ws, rs, offsets, h, h_kv, head_groups = case
    return StaticDilatedKVCache(
        segment_lengths=ws, dilation_rates=rs, offsets=offsets, head_groups=head_groups, num_heads=h,
        num_kv_heads=h_kv, head_dim=d, scale=None, batch_size=b, max_length=max_length, dtype=dtype,
        device=device, backend=backend, block_k=block_k, tiles=tiles,
    )


def _inputs(case, b, n, d, dtype=torch.float64):
    _, _, _, h, h_kv, _ = case
    return tuple(torch.randn(b, n, heads, d, dtype=torch.float64).to(dtype) for heads in (h, h_kv, h_kv))


def _rows_reference(case, q, k, v, starts):
    """Per row its own sequence (columns ``start..``) through the dense causal reference, left-aligned."""
    ws, rs, offsets, _, _, head_groups = case
    return [reference_dilated_attention(q[i : i + 1, s:], k[i : i + 1, s:], v[i : i + 1, s:], ws, rs, is_causal=True,
                                        offsets=offsets, head_groups=head_groups)[0][0] for i, s in enumerate(starts)]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("prompt", [0, 1, 7])
def test_torch_path_steps_equal_full_causal_rows(case, prompt):
    b, d = 2, 8
    n = 2 * max(case[0]) + 5  # several segments of every pattern, the last one partial
    q, k, v = _inputs(case, b, n, d)
    ref = _rows_reference(case, q, k, v, (0,) * b)
    cache = _cache(case, b, d, max_length=n)
    size = cache.numel()
    cache.fill(k[:, :prompt], v[:, :prompt])  # prompt 0: an empty fill
    assert cache.position == prompt
    for t in range(prompt, n):
        out = cache.attend(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        for i in range(b):
            torch.testing.assert_close(out[i, 0], ref[i][t], rtol=1e-12, atol=1e-12, msg=lambda m: f"step {t}: {m}")
    assert cache.position == n and cache.numel() == size
    with pytest.raises(ValueError, match="past max_length=.*would hold"):
        cache.attend(q[:, :1], k[:, :1], v[:, :1])


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[5], CASES[6]], ids=["gqa", "r-not-dividing-w", "groups",
                                                                                 "explicit"])
def test_left_padded_rows_equal_each_row_alone(case):
    b, d = 3, 4
    prompt = max(case[0]) + 2
    starts = [0, random.randint(1, prompt - 1), prompt - 1]  # the last row: a one-token prompt
    n = prompt + max(case[0]) + 3
    q, k, v = _inputs(case, b, n, d)
    k[1, : starts[1]], v[2, : starts[2]] = float("nan"), float("inf")  # padding is never read
    ref = _rows_reference(case, q, k, v, starts)
    cache = _cache(case, b, d, max_length=n)
    cache.fill(k[:, :prompt], v[:, :prompt], sequence_starts=starts)
    for t in range(prompt, n):
        out = cache.attend(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        for i, s in enumerate(starts):
            torch.testing.assert_close(out[i, 0], ref[i][t - s], rtol=1e-12, atol=1e-12, msg=lambda m: f"{t} {i}: {m}")


KERNEL_CASES = [
    ((4, 8), (1, 2), "paper", 4, 2, False),  # GQA, two lanes per key/value head
    ((3, 6), (2, 4), "torchscale", 3, 1, False),  # r does not divide w, head 0 without keys at t % 6 == 1
    ((2, 5, 9), (1, 2, 3), "paper", 4, 2, True),  # head groups
    ((4, 6), (2, 3), [[1, 0, 1, 0], [2, 2, 0, 1]], 4, 4, False),  # explicit offsets
]


LONG_LANES = ((36, 40), (1, 2), "paper", 4, 2, False)  # lanes of up to 36 keys: several tiles or chunks of 16


@needs_triton
@pytest.mark.parametrize("case, tiles", [(c, 1) for c in KERNEL_CASES] + [(LONG_LANES, 1), (LONG_LANES, 2)],
                         ids=["gqa", "uneven", "groups", "explicit", "chunks", "tiles"])
def test_triton_kernels_equal_the_torch_path(case, tiles):
    """Outputs and both stores, step by step, past the largest segment, rows with different starts, lanes
    longer than a program's tile (16 keys): split over programs (``tiles=1``) or over a program's tiles."""
    b, d = 2, 8
    prompt = max(4, max(case[0]) - 6)  # long lanes from the first step on (interpreted steps are slow)
    starts = [0, random.randint(1, prompt - 1)]
    n = prompt + max(case[0]) + 1 if prompt == 4 else max(case[0]) + 2
    q, k, v = _inputs(case, b, n, d, torch.float32)  # the last step is past the largest segment
    eager = _cache(case, b, d, n, dtype=torch.float32)
    kernel = _cache(case, b, d, n, backend="triton", dtype=torch.float32, device=KERNEL_DEVICE, tiles=tiles)
    for cache, dev in ((eager, "cpu"), (kernel, KERNEL_DEVICE)):
        cache.fill(k[:, :prompt].to(dev), v[:, :prompt].to(dev), sequence_starts=starts)
    for t in range(prompt, n):
        ref = eager.attend(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        out = kernel.attend(*(x[:, t : t + 1].to(KERNEL_DEVICE) for x in (q, k, v)))
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {t}: {m}")
    assert torch.equal(kernel._keys.cpu(), eager._keys) and torch.equal(kernel._values.cpu(), eager._values)
    assert torch.equal(kernel._positions.cpu(), eager._positions)


def _last_step(case, q, k, v, backend):
    """The last row of ``q, k, v`` decoded after a prompt of all the others."""
    dev = KERNEL_DEVICE if backend == "triton" else "cpu"
    cache = _cache(case, 1, q.shape[-1], q.shape[1], backend=backend, dtype=q.dtype, device=dev)
    cache.fill(k[:, :-1].to(dev), v[:, :-1].to(dev))
    return cache.attend(q[:, -1:].to(dev), k[:, -1:].to(dev), v[:, -1:].to(dev))[0, 0].cpu()  # (h, d)


def _spots(backend, n):
    """(position, key/value head) pairs to corrupt: every one of the last 8 positions on the torch path; on
    Triton's interpreter the newest token (seen by every head of pattern 0), one two back and one further."""
    if backend == "torch":
        return [(u, kh) for u in range(n - 8, n) for kh in range(2)]
    return [(n - 1, random.randrange(2)), (n - 3, random.randrange(2)), (random.randrange(n - 8, n - 4), 0)]


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_reaches_only_the_heads_that_attend_it(backend, bad):
    """The heads whose output depends on a value (found by changing it to two finite values) give NaN for a
    NaN or inf there; every other head gives exactly what it gives with a finite value."""
    case = ((4, 8), (1, 4), "paper", 4, 2, False)
    n = 11
    dtype = torch.float64 if backend == "torch" else torch.float32
    q, k, v = _inputs(case, 1, n, 4, dtype)
    attended = []
    for u, kh in _spots(backend, n):
        outs = []
        for value in (1.5, -3.0, bad):
            v2 = v.clone()
            v2[0, u, kh] = value
            outs.append(_last_step(case, q, k, v2, backend))
        attends = (outs[0] != outs[1]).any(-1)  # (h,)
        assert outs[2][attends].isnan().all() and outs[2][~attends].isfinite().all(), (u, kh)
        torch.testing.assert_close(outs[2][~attends], outs[0][~attends], rtol=0, atol=0)
        attended.append(attends)
    attended = torch.stack(attended)
    assert attended.any() and not attended.all()  # both kinds of head were checked


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
def test_a_nan_key_reaches_only_the_heads_that_see_it(backend):
    """A NaN key in another head's lane (same key/value head, another phase) never reaches a head: NaN exactly
    where the full causal pass has it, equal values elsewhere."""
    case = ((4, 8), (1, 4), "paper", 4, 2, False)
    n = 11
    dtype = torch.float64 if backend == "torch" else torch.float32
    for u, kh in _spots(backend, n):
        q, k, v = _inputs(case, 1, n, 4, torch.float64)
        k[0, u, kh] = float("nan")
        full = _rows_reference(case, q, k, v, (0,))[0][-1]  # (h, d)
        out = _last_step(case, q.to(dtype), k.to(dtype), v.to(dtype), backend).double()
        assert torch.equal(out.isnan(), full.isnan()), (u, kh)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out[~full.isnan()], full[~full.isnan()], rtol=tol, atol=tol)


def test_huge_segments_cost_only_max_length():
    case = ((4, 2**62), (1, 2**40), "paper", 2, 2, False)
    n = 9
    q, k, v = _inputs(case, 2, n, 4)
    ref = _rows_reference(case, q, k, v, (0, 0))
    cache = _cache(case, 2, 4, max_length=n)
    assert cache.numel() <= 2 * 2 * 2 * 4 * (4 + n)  # per key/value head: one 4-segment and one lane of n
    cache.fill(k[:, :3], v[:, :3])
    for t in range(3, n):
        out = cache.attend(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1])
        torch.testing.assert_close(out[:, 0], torch.stack([r[t] for r in ref]), rtol=1e-12, atol=1e-12)


def test_size_is_fixed_and_bounded_by_the_lanes():
    """Per (slot, key/value head) one lane of min(len(range(o, w, r)), ceil(max_length / r)) rows (or fewer),
    allocated once: numel never changes however many steps run."""
    case = ((4, 8, 16), (1, 2, 4), "torchscale", 4, 2, False)
    b, d, max_length = 2, 4, 100
    cache = _cache(case, b, d, max_length)
    bound = sum(2 * b * d * 2 * min(-(-w // r), -(-max_length // r)) * r for w, r in zip(*case[:2]))
    assert 0 < cache.numel() <= bound
    size = cache.numel()
    x = torch.randn(b, 1, 2, d, dtype=torch.float64)
    for _ in range(max_length):
        cache.attend(torch.randn(b, 1, 4, d, dtype=torch.float64), x, x)
        assert cache.numel() == size


def test_errors():
    case = ((4,), (1,), "paper", 2, 2, False)
    cache = _cache(case, 1, 4, max_length=5)
    x = torch.randn(1, 1, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="one token per row"):
        cache.attend(*(torch.randn(1, 2, 2, 4, dtype=torch.float64) for _ in range(3)))
    with pytest.raises(ValueError, match="query must have shape"):
        cache.attend(torch.randn(1, 1, 3, 4), x, x)
    with pytest.raises(ValueError, match="fit max_length=5"):
        cache.fill(torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4))
    cache.fill(torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 4), sequence_starts=[3])  # 5 tokens: fits
    with pytest.raises(ValueError, match="past max_length=5"):
        cache.attend(x, x, x)
    with pytest.raises(ValueError, match="empty cache"):
        cache.fill(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4))
    with pytest.raises(ValueError, match="past max_length"):
        cache.replayed(1)
    with pytest.raises(ValueError, match="index must hold batch_size=1 rows"):
        cache.reorder(torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        _cache(case, 1, 4, max_length=0)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
        _cache(case, 1, 4, max_length=4, block_k=12)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
        _cache(case, 1, 4, max_length=4, block_k=8)
    with pytest.raises(ValueError, match="backend must be one of"):
        _cache(case, 1, 4, max_length=4, backend="cuda")


def test_lm_with_a_static_state_gives_the_full_pass_logits():
    """``LongNetLM.new_state(b, max_length=...)``: a prompt (one row left-padded) then one token per step past
    the largest segment; every step's logits equal the full pass over each row's own tokens."""
    model = LongNetLM(vocab_size=40, embed_dim=32, num_heads=4, num_kv_heads=2, num_layers=2,
                      segment_lengths=(3, 8, 16), dilation_rates=(1, 2, 4)).double().eval()
    prompt_lengths = (6, random.randint(1, 5))
    width, total = max(prompt_lengths), 20
    ids = torch.randint(0, 40, (2, total))
    starts = [width - p for p in prompt_lengths]
    state = model.new_state(2, max_length=total)
    assert all(isinstance(c, StaticDilatedKVCache) for c in state.layers)
    size = state.numel()
    with torch.no_grad():
        inc = [model(ids[:, :width], state, sequence_starts=starts)]
        inc += [model(ids[:, t : t + 1], state) for t in range(width, total)]
        inc = torch.cat(inc, dim=1)
        for i, s in enumerate(starts):
            torch.testing.assert_close(inc[i, s:], model(ids[i : i + 1, s:])[0], rtol=1e-10, atol=1e-10)
    assert state.numel() == size
