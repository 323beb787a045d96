"""Pattern builders: each returns a bool block layout ``(heads or 1, num_blocks, num_blocks)`` where
``layout[j, I, J]`` says whether query block ``I`` of head ``j`` sees key block ``J``.

Builders are pure functions of their arguments (``random_layout`` of its seed), so a layout can be
rebuilt anywhere, e.g. on every rank of a process group. Pictures of each are in ``docs/block_sparse.md``.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Union

import torch

from .. import _validation as V
from ..patterns import OffsetRule, pattern_groups

__all__ = [
    "adaptive_layout",
    "dilated_layout",
    "global_local_layout",
    "hierarchical_layout",
    "layout_density",
    "layout_from_mask_mod",
    "local_window_layout",
    "random_layout",
    "strided_layout",
]

Device = Optional[Union[str, torch.device]]


def _distance(num_blocks: int, device: Device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query block index (nb, 1) and key block index (1, nb)."""
    i = torch.arange(num_blocks, device=device)
    return i[:, None], i[None, :]


def local_window_layout(num_blocks: int, window: int, *, device: Device = None) -> torch.Tensor:
    """Query block ``I`` sees key blocks ``J`` with ``|I - J| <= window`` (``window=0``: the diagonal)."""
    num_blocks = V.check_int("num_blocks", num_blocks)
    window = V.check_int("window", window, minimum=0)
    qi, kj = _distance(num_blocks, device)
    return ((qi - kj).abs() <= window)[None]


def dilated_layout(
    num_blocks: int,
    num_heads: int,
    segment_blocks: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    offsets: OffsetRule = "paper",
    head_groups: bool = False,
    device: Device = None,
) -> torch.Tensor:
    """LongNet's pattern (README, "What it computes") with blocks as tokens: block ``I`` of head ``j`` sees
    block ``J`` through pattern ``i`` iff both lie in one segment of ``W_i = min(segment_blocks[i], num_blocks)``
    blocks and ``(I mod W_i) mod r_i == o_i(j) == (J mod W_i) mod r_i``. The layout is the union over
    patterns (a key reached through two patterns is seen once: one joint softmax, not LongNet's counts).
    With ``block_size = 1`` it is exactly ``count_matrix(...) > 0`` of the token-level model."""
    num_blocks = V.check_int("num_blocks", num_blocks)
    num_heads = V.check_int("num_heads", num_heads)
    ws, rs = V.check_patterns(segment_blocks, dilation_rates)
    offsets = V.check_offsets(offsets, rs, num_heads, V.check_bool("head_groups", head_groups))
    t = torch.arange(num_blocks, device=device)
    layout = torch.zeros(num_heads, num_blocks, num_blocks, dtype=torch.bool, device=device)
    for group in pattern_groups(num_blocks, num_heads, ws, rs, offsets, head_groups):
        seg = group.segment
        on = ((t % seg) % group.dilation) == group.offset  # (nb,)
        same = (t[:, None] // seg) == (t[None, :] // seg)
        mask = same & on[:, None] & on[None, :]
        layout[list(group.heads)] |= mask
    return layout


def global_local_layout(
    num_blocks: int, window: int, global_blocks: Union[int, Sequence[int]], *, device: Device = None
) -> torch.Tensor:
    """Local window plus global blocks (Longformer/BigBird style): a global block's queries see every
    key block and every query block sees it. ``global_blocks``: a count (the first ones) or indices."""
    layout = local_window_layout(num_blocks, window, device=device)
    if isinstance(global_blocks, numbers.Integral) and not isinstance(global_blocks, bool):
        count = V.check_int("global_blocks", global_blocks, minimum=0)
        if count > num_blocks:
            raise ValueError(f"global_blocks must be <= num_blocks ({num_blocks}), but got {count}")
        index = list(range(count))
    else:
        index = [V.check_int(f"global_blocks[{i}]", g, minimum=0) for i, g in enumerate(global_blocks)]
        bad = [g for g in index if g >= num_blocks]
        if bad:
            raise ValueError(f"global_blocks must be block indices in [0, {num_blocks}), but got {bad}")
    layout[0, index, :] = True
    layout[0, :, index] = True
    return layout


def strided_layout(num_blocks: int, stride: int, *, window: int = 0, device: Device = None) -> torch.Tensor:
    """Sparse-Transformer strided pattern: ``(I - J) mod stride == 0`` or ``|I - J| <= window``."""
    stride = V.check_int("stride", stride)
    layout = local_window_layout(num_blocks, window, device=device)
    qi, kj = _distance(num_blocks, device)
    return layout | (((qi - kj) % stride) == 0)[None]


def random_layout(
    num_blocks: int,
    density: float,
    *,
    num_heads: int = 1,
    seed: int = 0,
    include_diagonal: bool = True,
    device: Device = None,
) -> torch.Tensor:
    """Each block on independently with probability ``density``, drawn on the CPU from ``seed`` (the
    same layout on every device and rank); the diagonal is always on when ``include_diagonal``."""
    num_blocks = V.check_int("num_blocks", num_blocks)
    num_heads = V.check_int("num_heads", num_heads)
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be a float in [0, 1], but got {density!r}")
    seed = V.check_int("seed", seed, minimum=0)
    gen = torch.Generator().manual_seed(seed)
    layout = torch.rand(num_heads, num_blocks, num_blocks, generator=gen) < float(density)
    if V.check_bool("include_diagonal", include_diagonal):
        layout |= torch.eye(num_blocks, dtype=torch.bool)
    return layout.to(device)


def hierarchical_layout(
    num_blocks: int, levels: Sequence[tuple[int, int]], *, device: Device = None
) -> torch.Tensor:
    """Several levels of resolution; level ``(window, stride)`` lets block ``I`` see key blocks ``J``
    with ``J mod stride == 0`` and ``|I - J| <= window * stride``: fine detail nearby, every
    ``stride``-th block further away. ``levels=[(2, 1), (4, 4), (8, 16)]`` is a three-level pyramid."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise ValueError(f"levels must be a non-empty list of (window, stride) pairs, but got {levels!r}")
    qi, kj = _distance(V.check_int("num_blocks", num_blocks), device)
    layout = torch.zeros(num_blocks, num_blocks, dtype=torch.bool, device=device)
    for i, level in enumerate(levels):
        if not isinstance(level, Sequence) or len(level) != 2:
            raise ValueError(f"levels[{i}] must be a (window, stride) pair, but got {level!r}")
        window = V.check_int(f"levels[{i}][0] (window)", level[0], minimum=0)
        stride = V.check_int(f"levels[{i}][1] (stride)", level[1])
        layout |= ((kj % stride) == 0) & ((qi - kj).abs() <= window * stride)
    return layout[None]


def layout_from_mask_mod(
    mask_mod: Callable,
    seq_len: int,
    block_size: int,
    *,
    num_heads: int = 1,
    is_causal: bool = False,
    device: Device = None,
) -> torch.Tensor:
    """The layout of a token-level ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's form,
    evaluated with ``b = 0``). A block is on iff the mask allows some pair in it. The mask must be
    block-aligned: inside every block it allows all pairs or none (with ``is_causal=True``: all pairs
    ``kv_idx <= q_idx`` or none), else ValueError, since block-sparse attention cannot honour a mask
    inside a tile. Evaluated one query block at a time (memory O(heads * block_size * seq_len))."""
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable (b, h, q_idx, kv_idx) -> bool, but got {type(mask_mod).__name__}")
    n = V.check_int("seq_len", seq_len)
    bs = V.check_int("block_size", block_size)
    num_heads = V.check_int("num_heads", num_heads)
    is_causal = V.check_bool("is_causal", is_causal)
    nb = -(-n // bs)
    pad = nb * bs - n
    kv = torch.arange(n, device=device)[None, None, :]  # (1, 1, n)
    heads = torch.arange(num_heads, device=device)[:, None, None]  # (h, 1, 1)
    b = torch.zeros((), dtype=torch.long, device=device)
    layout = torch.zeros(num_heads, nb, nb, dtype=torch.bool, device=device)

    def tiles(x: torch.Tensor) -> torch.Tensor:  # (h, rows, n) -> (h, rows, nb, bs), padding False
        return torch.nn.functional.pad(x, (0, pad)).unflatten(2, (nb, bs))

    for qb in range(nb):
        q = torch.arange(qb * bs, min(n, (qb + 1) * bs), device=device)[None, :, None]  # (1, rows, 1)
        allowed = mask_mod(b, heads, q, kv)
        if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool:
            raise TypeError(f"mask_mod must return a bool tensor, but got {getattr(allowed, 'dtype', type(allowed))}")
        allowed = tiles(allowed.expand(num_heads, q.shape[1], n))
        full = tiles((kv <= q) if is_causal else torch.ones(1, q.shape[1], n, dtype=torch.bool, device=device))
        on = allowed.any(dim=(1, 3))  # (h, nb)
        aligned = (allowed == (full & on[:, None, :, None])).all(dim=(1, 3))
        if not bool(aligned.all()):
            j, kb = (~aligned).nonzero()[0].tolist()
            raise ValueError(
                f"mask_mod is not block-aligned for block_size={bs} (is_causal={is_causal}): head {j}, "
                f"query block {qb}, key block {kb} is partly allowed; use a smaller block_size or a "
                "block-aligned mask"
            )
        layout[:, qb] = on
    return layout


@torch.no_grad()
def adaptive_layout(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: int,
    top_k: int,
    *,
    is_causal: bool = False,
    include_diagonal: bool = True,
) -> torch.Tensor:
    """Content-based layout, per head. Rule: pool each block by the mean of its tokens (and over the
    batch): ``q̄[j, I]``, ``k̄[j, J]`` (key heads repeated for GQA); score ``s[j, I, J] = q̄ · k̄``;
    under ``is_causal`` blocks ``J > I`` are excluded; keep the ``top_k`` highest-scoring key blocks of
    each query block (ties as ``torch.topk`` breaks them), plus the diagonal block when ``include_diagonal`` (so no row
    is empty). The selection is not differentiable; gradients flow through the attention of the kept
    blocks. ``query (b, n, h, d)``, ``key (b, n, h_kv, d)`` -> layout ``(h, nb, nb)``."""
    V.check_qkv(query, key, key)
    bs = V.check_int("block_size", block_size)
    top_k = V.check_int("top_k", top_k)
    b, n, h, d = query.shape
    group = h // key.shape[2]
    nb = -(-n // bs)
    pad = nb * bs - n
    counts = torch.full((nb,), float(bs), device=query.device)
    counts[-1] = bs - pad

    def pool(x: torch.Tensor) -> torch.Tensor:  # (b, n, H, d) -> (H, nb, d), float32
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad))
        return x.unflatten(1, (nb, bs)).sum(dim=(0, 2)).transpose(0, 1) / (counts[None, :, None] * b)

    qp = pool(query)  # (h, nb, d)
    kp = pool(key).repeat_interleave(group, dim=0)  # (h, nb, d)
    scores = qp @ kp.transpose(-1, -2)  # (h, nb, nb)
    blocks = torch.arange(nb, device=query.device)
    if is_causal:
        scores = scores.masked_fill(blocks[None, :] > blocks[:, None], float("-inf"))
    k = min(top_k, nb)
    idx = torch.topk(scores, k, dim=-1, sorted=False).indices
    layout = torch.zeros(h, nb, nb, dtype=torch.bool, device=query.device)
    layout.scatter_(-1, idx, True)
    if is_causal:  # fewer than top_k causal candidates: drop the -inf picks
        layout &= blocks[None, :] <= blocks[:, None]
    if include_diagonal:
        layout |= torch.eye(nb, dtype=torch.bool, device=query.device)
    return layout


def layout_density(layout: torch.Tensor, *, is_causal: bool = False) -> float:
    """Fraction of the (causally possible, if ``is_causal``) blocks that are on."""
    nb = layout.shape[-1]
    if is_causal:
        tril = torch.ones(nb, nb, dtype=torch.bool, device=layout.device).tril()
        return float((layout & tril).sum()) / (layout.shape[0] * tril.sum().item())
    return float(layout.sum()) / layout.numel()
