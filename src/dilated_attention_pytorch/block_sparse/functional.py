"""``block_sparse_attention``: check the arguments once (:func:`sparse_args`), then :func:`attend`: choose a
backend and run it.

Query ``t`` of head ``j`` sees key ``u`` iff ``layout[j, t // block_size, u // block_size]`` (and
``u <= t`` when causal), with ONE softmax over all the keys a row sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .. import _validation as V
from ..capabilities import Backend, Support, first_supported
from ..kernels import BlockInputs
from .cache import METADATA_CACHE, layout_digest, tensor_bytes
from .flex import FLEX, flex_block_sparse_attention, layout_block_mask
from .plan import BlockPlan, build_plan
from .portable import portable_block_sparse_attention
from .triton_path import TRITON, triton_block_sparse_attention

__all__ = ["BACKENDS", "SPARSE_BACKENDS", "SparseArgs", "attend", "block_sparse_attention", "block_sparse_backend",
           "check_layout", "plan_for_layout", "sparse_args"]

PORTABLE = Backend("portable", Support(key_mask=False, dropout=False),
                   "batched block kernels over the active tiles, fp32 log-sum-exp merge")
SPARSE_BACKENDS = (PORTABLE, FLEX, TRITON)
BACKENDS = ("auto",) + tuple(b.name for b in SPARSE_BACKENDS)
_BY_NAME = {b.name: b for b in SPARSE_BACKENDS}


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


def _priority(query: torch.Tensor, backend: str) -> tuple[Backend, ...]:
    """``"auto"``: on a GPU our Triton kernels, then FlexAttention, on Hopper and later; FlexAttention first
    on older GPUs (on those our kernels lose their tensor-descriptor loads and have not been timed; see
    BENCHMARKS.md); then ``"portable"``, the only choice off the GPU."""
    if backend != "auto":
        return (_BY_NAME[backend],)
    if query.device.type != "cuda":
        return (PORTABLE,)
    hopper = torch.cuda.get_device_capability(query.device)[0] >= 9
    return ((TRITON, FLEX) if hopper else (FLEX, TRITON)) + (PORTABLE,)


def _choose(query: torch.Tensor, block_size: int, backend: str) -> str:
    inputs = BlockInputs(query.device.type, query.dtype, query.shape[-1], False, False, False, block_size)
    return first_supported(_priority(query, backend), inputs, f"backend={backend!r} cannot run these inputs")[0].name


def block_sparse_backend(query: torch.Tensor, block_size: int, backend: str = "auto") -> str:
    """The backend that runs these inputs: the first of :func:`_priority` that supports them; a named
    backend that cannot run them raises a ``ValueError`` with its reasons."""
    return _choose(query, block_size, V.check_choice("backend", backend, BACKENDS))


@dataclass(frozen=True)
class SparseArgs:
    """The checked settings of a block-sparse call (its tensors and layout go beside them)."""

    block_size: int  # at most n: any block_size >= n is one block of n tokens
    is_causal: bool
    scale: float  # d ** -0.5 when not given
    return_lse: bool
    backend: str


def sparse_args(query: torch.Tensor, layout, *, block_size, is_causal, scale, return_lse, backend) -> SparseArgs:
    """The other arguments of a block-sparse call whose query, key and value are checked, checked once."""
    block_size = V.check_int("block_size", block_size)
    is_causal = V.check_bool("is_causal", is_causal)
    return_lse = V.check_bool("return_lse", return_lse)
    scale = V.check_scale("scale", scale)
    b, n, h, d = query.shape
    check_layout(layout, h, n, block_size, query.device)
    # Any block_size >= n gives the one-block layout (1, 1): tiles of n tokens compute the same, and
    # no work or memory grows with block_size beyond the sequence.
    return SparseArgs(min(block_size, n), is_causal, d**-0.5 if scale is None else scale, return_lse,
                      V.check_choice("backend", backend, BACKENDS))


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: torch.Tensor,
           args: SparseArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on checked arguments -> ``(out (b, n, h, d), lse (b, h, n))``."""
    n, h = query.shape[1], query.shape[2]
    bs, causal = args.block_size, args.is_causal
    chosen = _choose(query, bs, args.backend)
    if chosen == "triton":
        return triton_block_sparse_attention(query, key, value, layout, block_size=bs,
                                             is_causal=causal, scale=args.scale)
    if chosen == "flex":
        return flex_block_sparse_attention(query, key, value, _flex_mask(layout, n, bs, causal), scale=args.scale)
    plan = plan_for_layout(layout, h, n, bs, causal)
    return portable_block_sparse_attention(query, key, value, plan, scale=args.scale, lse_needs_grad=args.return_lse)


def block_sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: torch.Tensor, *, block_size: int,
    is_causal: bool = False, scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto",
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
            ``"triton"`` (our kernels, no compile step: CUDA, or the CPU under ``TRITON_INTERPRET=1``;
            float16/bfloat16) or ``"portable"`` (batched aten kernels over the active tiles, any device and
            dtype); the table of what each supports: ``python -m dilated_attention_pytorch info``.

    Rows that see no key get zeros, LSE ``-inf`` and no gradient. Layout-derived metadata (index plans,
    block masks) is cached in :data:`~dilated_attention_pytorch.block_sparse.cache.METADATA_CACHE`,
    keyed by the layout's content; that content hash is kept while the layout tensor is unchanged by
    PyTorch's version counter. Edit a layout in place only through PyTorch ops (``layout[i] = ...``,
    ``copy_``): writes through ``.data``, DLPack or a NumPy view are not seen — pass a new tensor.
    """
    V.check_qkv(query, key, value)
    args = sparse_args(query, layout, block_size=block_size, is_causal=is_causal, scale=scale, return_lse=return_lse,
                       backend=backend)
    out, lse = attend(query, key, value, layout, args)
    return (out, lse) if args.return_lse else out
