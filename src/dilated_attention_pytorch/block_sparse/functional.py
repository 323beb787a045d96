"""``block_sparse_attention``: validate, choose a backend, run (SPEC §2).

Query ``t`` of head ``j`` sees key ``u`` iff ``layout[j, t // block_size, u // block_size]`` (and
``u <= t`` when causal), with ONE softmax over all the keys a row sees.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _validation as V
from .cache import METADATA_CACHE, layout_digest, tensor_bytes
from .flex import flex_block_sparse_attention, flex_reasons, layout_block_mask
from .plan import BlockPlan, build_plan
from .portable import portable_block_sparse_attention
from .triton_path import triton_block_sparse_attention, triton_reasons

__all__ = ["BACKENDS", "block_sparse_attention", "block_sparse_backend", "check_layout", "plan_for_layout"]

BACKENDS = ("auto", "portable", "flex", "triton")


def check_layout(layout, num_heads: int, seq_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    """layout: bool (num_heads or 1, ceil(n/block_size), ceil(n/block_size)) on the inputs' device."""
    if not isinstance(layout, torch.Tensor):
        raise TypeError(f"layout must be a bool torch.Tensor, but got {type(layout).__name__}")
    V.check_dense("layout", layout)
    if layout.dtype != torch.bool:
        raise TypeError(f"layout must have dtype torch.bool, but got {layout.dtype}")
    nb = -(-seq_len // block_size)
    if layout.dim() != 3 or layout.shape[0] not in (1, num_heads) or tuple(layout.shape[1:]) != (nb, nb):
        raise ValueError(
            f"layout must have shape ({num_heads} or 1, ceil(seq/block_size), ceil(seq/block_size)) = "
            f"({num_heads} or 1, {nb}, {nb}) for seq={seq_len}, block_size={block_size}, "
            f"but got {tuple(layout.shape)}"
        )
    if layout.device != device:
        raise ValueError(f"layout must be on the device of query ({device}), but got {layout.device}")
    return layout


def plan_for_layout(layout: torch.Tensor, num_heads: int, seq_len: int, block_size: int, is_causal: bool) -> BlockPlan:
    """The portable path's index plan for a validated layout, from the metadata LRU."""
    key = ("plan", layout_digest(layout), tuple(layout.shape), num_heads, seq_len, block_size, is_causal,
           str(layout.device))

    def make() -> BlockPlan:
        blocks = torch.arange(layout.shape[1], device=layout.device)
        full = layout.expand(num_heads, -1, -1)
        return build_plan(full, blocks, blocks, seq_len, block_size, is_causal)

    return METADATA_CACHE.get_or_create(key, make, tensor_bytes)


def _flex_mask(layout: torch.Tensor, seq_len: int, block_size: int, is_causal: bool):
    key = ("flex", layout_digest(layout), tuple(layout.shape), seq_len, block_size, is_causal, str(layout.device))
    return METADATA_CACHE.get_or_create(
        key, lambda: layout_block_mask(layout, seq_len, block_size, is_causal), tensor_bytes
    )


_REASONS = {"flex": flex_reasons, "triton": triton_reasons}


def block_sparse_backend(query: torch.Tensor, block_size: int, backend: str = "auto") -> str:
    """The backend that runs these inputs. ``"auto"``: on a GPU our Triton kernels, else FlexAttention,
    whichever has no reasons against it, on Hopper and later; FlexAttention first on older GPUs (on an
    H200, forward+backward, ours is level with FlexAttention at 64K tokens and 6-8% faster at 256K,
    BENCHMARKS.md; on older GPUs our kernels lose their tensor-descriptor loads and have not been
    timed); else ``"portable"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, but got {backend!r}")
    if backend in _REASONS:
        reasons = _REASONS[backend](query, block_size)
        if reasons:
            raise ValueError(f"backend={backend!r} cannot run these inputs: {'; '.join(reasons)}")
        return backend
    if backend == "auto" and query.device.type == "cuda":
        hopper = torch.cuda.get_device_capability(query.device)[0] >= 9
        for name in ("triton", "flex") if hopper else ("flex", "triton"):
            if not _REASONS[name](query, block_size):
                return name
    return "portable"


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: torch.Tensor,
    *,
    block_size: int,
    is_causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Exact block-sparse attention with one joint softmax per query row.

    Args:
        query: ``(b, n, h, d)``.
        key, value: ``(b, n, h_kv, d)`` with ``h % h_kv == 0`` (grouped-query attention).
        layout: bool ``(h or 1, ceil(n/block_size), ceil(n/block_size))``; query ``t`` of head ``j`` sees
            key ``u`` iff ``layout[j, t // block_size, u // block_size]`` (and ``u <= t`` if causal).
        block_size: tokens per block; ``n`` need not be a multiple of it (any ``block_size >= n`` is
            one block of ``n`` tokens).
        is_causal: also require ``u <= t``.
        scale: score scale, default ``d ** -0.5``.
        return_lse: also return the log-sum-exp ``(b, h, n)`` (float32; float64 for float64 inputs).
        backend: ``"auto"`` (on a GPU the Triton kernels where they run, else FlexAttention — on GPUs
            older than Hopper FlexAttention first —, else portable), ``"flex"`` (FlexAttention, CUDA),
            ``"triton"`` (our kernels, no compile step: CUDA, or the CPU under ``TRITON_INTERPRET=1``; float16/bfloat16) or ``"portable"``
            (batched aten kernels over the active tiles, any device and dtype).

    Rows that see no key get zeros, LSE ``-inf`` and no gradient. Layout-derived metadata (index plans,
    block masks) is cached in :data:`~dilated_attention_pytorch.block_sparse.cache.METADATA_CACHE`,
    keyed by the layout's content; that content hash is kept while the layout tensor is unchanged by
    PyTorch's version counter. Edit a layout in place only through PyTorch ops (``layout[i] = ...``,
    ``copy_``): writes through ``.data``, DLPack or a NumPy view are not seen — pass a new tensor.
    """
    V.check_qkv(query, key, value)
    block_size = V.check_int("block_size", block_size)
    is_causal = V.check_bool("is_causal", is_causal)
    return_lse = V.check_bool("return_lse", return_lse)
    scale = V.check_scale("scale", scale)
    b, n, h, d = query.shape
    layout = check_layout(layout, h, n, block_size, query.device)
    # Any block_size >= n gives the one-block layout (1, 1): tiles of n tokens compute the same, and
    # no work or memory grows with block_size beyond the sequence.
    block_size = min(block_size, n)
    if scale is None:
        scale = d**-0.5
    chosen = block_sparse_backend(query, block_size, backend)
    if chosen == "triton":
        out, lse = triton_block_sparse_attention(
            query, key, value, layout, block_size=block_size,
            is_causal=is_causal, scale=scale,
        )
    elif chosen == "flex":
        out, lse = flex_block_sparse_attention(
            query, key, value, _flex_mask(layout, n, block_size, is_causal), scale=scale
        )
    else:
        plan = plan_for_layout(layout, h, n, block_size, is_causal)
        out, lse = portable_block_sparse_attention(query, key, value, plan, scale=scale, lse_needs_grad=return_lse)
    return (out, lse) if return_lse else out
