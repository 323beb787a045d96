"""The GPU path: FlexAttention with a ``BlockMask`` built straight from the block layout.

Time is proportional to the active tiles: the kernel visits only the key blocks each query block lists.
Under ``is_causal`` the diagonal tiles are the only partial ones (their ``mask_mod`` is evaluated);
every other active tile is a *full* block that skips ``mask_mod``. Nothing of size n x n is built: the
block mask holds block indices only. The compiled ``flex_attention`` is built once and held.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from ..capabilities import Backend, Support
from ..kernels import BlockInputs

__all__ = ["FLEX", "default_kernel_options", "flex_reasons", "layout_block_mask", "flex_block_sparse_attention"]

FLEX_TILE = 128  # the layout's blocks must be whole multiples of FlexAttention's kernel tiles


FLEX = Backend(
    "flex", Support(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32), max_head_dim=256,
                    block_multiple=FLEX_TILE, key_mask=False, dropout=False),
    "FlexAttention with a BlockMask built from the layout (compiled once; it has no CPU backward)",
)


def flex_reasons(query: torch.Tensor, block_size: int) -> list[str]:
    """Why the FlexAttention path cannot run these inputs (empty: it can)."""
    return FLEX.not_supported_reasons(BlockInputs(query.device.type, query.dtype, query.shape[-1], False, False,
                                                  False, block_size))


def _flex_module() -> Any:
    from torch.nn.attention import flex_attention as flex  # optional: present from torch 2.5

    return flex


def _kv_blocks(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, nq, nk) bool -> (num (1, H, nq) int32, indices (1, H, nq, nk) int32 with active blocks first,
    in ascending order)."""
    num = active.sum(-1, dtype=torch.int32)
    idx = torch.argsort(active.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None], idx[None]


def layout_mask_mod(layout: torch.Tensor, block_size: int, is_causal: bool) -> Callable:
    """``mask_mod(b, h, q_idx, kv_idx)`` of the layout at token level (what FlexAttention evaluates on
    partial tiles, and everywhere in its unfused eager mode)."""
    per_head = layout.shape[0] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = layout[h if per_head else 0, q_idx // block_size, kv_idx // block_size]
        return allowed & (kv_idx <= q_idx) if is_causal else allowed

    return mask_mod


def layout_block_mask(layout: torch.Tensor, seq_len: int, block_size: int, is_causal: bool) -> Any:
    """A FlexAttention ``BlockMask`` (batch 1, heads ``layout.shape[0]``) equal to the layout."""
    flex = _flex_module()
    h, nb, _ = layout.shape
    blocks = torch.arange(nb, device=layout.device)
    if is_causal:
        full = layout & (blocks[None, :, None] > blocks[None, None, :])
        partial = layout & (blocks[None, :, None] == blocks[None, None, :])
    else:
        full = layout
        partial = torch.zeros_like(layout)
    kv_num, kv_idx = _kv_blocks(partial)
    full_num, full_idx = _kv_blocks(full)
    return flex.BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
        # a private copy: a cached block mask must not change if the caller edits its layout in place
        mask_mod=layout_mask_mod(layout.clone(), block_size, is_causal), seq_lengths=(seq_len, seq_len),
    )


# FlexAttention's tile settings measured fastest for block-sparse layouts on Hopper (bf16, head_dim 128,
# block 128; benchmarks/flex_tuning.py, timings in BENCHMARKS.md): 128 x 128 forward tiles with 8 warps,
# 2 stages and TMA loads; its own backward tiles, with TMA loads.
HOPPER_KERNEL_OPTIONS = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2, "USE_TMA": True}


def default_kernel_options(query: torch.Tensor) -> Optional[dict]:
    """The measured tile settings where they won (Hopper, fp16/bf16, head_dim 128), else None
    (FlexAttention's own choice; at head_dim 64 they lost to it, see BENCHMARKS.md)."""
    if (query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] == 128 and torch.cuda.get_device_capability(query.device) == (9, 0)):
        return HOPPER_KERNEL_OPTIONS
    return None


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any, scale: float,
            kernel_options: Optional[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention on (b, n, h, d) tensors. The layout changes sit inside the compiled graph, so that
    its output is a contiguous (b, n, h, d) tensor and the incoming gradient (the same layout) is used
    as it is, not first copied into FlexAttention's (b, h, n, d) order."""
    flex = _flex_module()
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    out, aux = flex.flex_attention(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        return_aux=flex.AuxRequest(lse=True), kernel_options=kernel_options,
    )
    return out.transpose(1, 2), aux.lse


@functools.cache
def _compiled_attend() -> Callable:
    """``torch.compile`` of :func:`_attend`, built on first use and held."""
    return torch.compile(_attend, dynamic=False)


def flex_block_sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: Any, *, scale: float,
    kernel_options: Optional[dict] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (b, n, h, d), lse (b, h, n) float32). ``block_mask`` from :func:`layout_block_mask`;
    ``kernel_options`` are FlexAttention's (tile sizes, warps, stages), default
    :func:`default_kernel_options`."""
    # traced code calls _attend itself (the graph being compiled holds it; no cached call in the trace)
    attend = _attend if torch.compiler.is_compiling() else _compiled_attend()
    return attend(query, key, value, block_mask, scale,
                  default_kernel_options(query) if kernel_options is None else kernel_options)
