"""What an attention kernel for one dense block is, and how one is chosen.

A *block* is a batch of independent dense attention problems in layout (B, H, L, D): query, key and
value have the same length L (a dilated segment), key/value heads already match the query heads.
Every kernel returns the output in the input dtype and the natural-log LSE (B, H, L) in float32
(float64 for float64 inputs), and has a backward that takes the output and LSE it must use — which
need not be its own: the portable path passes the output and LSE merged over all patterns, so that
each block's backward yields its exact share of the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

__all__ = ["BlockInputs", "BlockKernel", "NoKernelError", "acc_dtype", "has_key", "host_checks", "inert_padding"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of LSEs and of accumulations: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_key(key_valid: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """(B, Lk) valid keys -> whether each query row sees at least one key: (B, Lq) for a causal (square)
    block, (B, 1) otherwise."""
    if is_causal:
        return key_valid.cumsum(-1) > 0
    return key_valid.any(-1, keepdim=True)


def host_checks(x: torch.Tensor) -> bool:
    """Whether a data-dependent check on ``x`` may sync with the host: on the CPU (no device queue to
    stall) and outside ``torch.compile`` (no host sync in a graph)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def inert_padding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor],
                  is_causal: bool, padding_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zeros in place of padded keys and values, and of the queries of rows that see no key.

    Masking a score is not enough to make a padded key unseen: a NaN or inf key gives a NaN score
    before the mask is added, and a probability of 0 times a NaN value is NaN. Padding is often
    uninitialised memory, so it is replaced by zeros (copies). A row that sees no key outputs zeros and
    takes no gradient whatever its query holds. With these inputs the gradients of padded keys and
    values are exactly zero wherever the incoming gradient and the real inputs are finite.

    ``padding_finite``: the caller has made the padded keys and values finite (the engine does it once
    per call, not once per block). Where :func:`host_checks` allows, nothing is copied when no key is
    padded, and queries are copied only when some row sees no key. ``q, k, v`` ``(B, H, L, D)``,
    ``key_valid (B, Lk)``."""
    if key_valid is None:
        return q, k, v
    check = host_checks(key_valid)
    if check and bool(key_valid.all()):
        return q, k, v
    if not padding_finite:
        padded = ~key_valid[:, None, :, None]
        k, v = k.masked_fill(padded, 0.0), v.masked_fill(padded, 0.0)
    has = has_key(key_valid, is_causal)  # (B, Lq) or (B, 1)
    if not (check and bool(has.all())):
        q = q.masked_fill(~has[:, None, :, None], 0.0)
    return q, k, v


@dataclass(frozen=True)
class BlockInputs:
    """What a kernel needs to know to say whether it can run a block."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    has_key_mask: bool
    dropout: bool
    needs_delta: bool  # backward must take an explicit delta (a gradient flows into the LSE)
    block_size: Optional[int] = None  # block-sparse calls: tokens per layout block


class NoKernelError(ValueError):
    """No kernel supports the inputs; the message lists every kernel's reasons."""


class BlockKernel(Protocol):
    name: str

    def not_supported_reasons(self, inputs: BlockInputs) -> list[str]: ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        key_valid: Optional[torch.Tensor],
        is_causal: bool,
        scale: float,
        dropout_p: float,
        padding_finite: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """-> (out (B,H,L,D), lse (B,H,L), rng_state for backward). Keys where ``key_valid`` is False
        are never read into a result whatever they hold (:func:`inert_padding`); ``padding_finite``:
        the caller has made them finite already."""
        ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        rng_state: Any,
        *,
        key_valid: Optional[torch.Tensor],
        is_causal: bool,
        scale: float,
        dropout_p: float,
        delta: Optional[torch.Tensor],
        padding_finite: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``lse`` is +inf on rows that see no key (their gradient is zero)."""
        ...
