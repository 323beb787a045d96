"""Which backend runs a call, and why the others do not (``explain_backend``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import _validation as V
from .kernels import FUSED_KERNELS, KERNELS, BlockInputs, BlockKernel, choose_kernel, kernel_reasons
from .kernels.triton_gather import triton_available

__all__ = ["BACKENDS", "BackendChoice", "choose_backend", "chunk_tokens", "explain_backend"]


def chunk_tokens(n: int) -> int:
    """Tokens per chunk of temporaries: the whole sequence up to CHUNK_TOKENS (chunks hold whole segments).

    Fewer chunks issue fewer kernels: at 64K tokens on an H200, two chunks instead of one left the
    forward bound by the host's time to issue its ~25 kernels (benchmarks/fused_profile.py)."""
    return max(1, min(CHUNK_TOKENS, n))

BACKENDS = ("auto", "fused", "portable", "reference")
CHUNK_TOKENS = 1 << 17  # tokens per chunk of temporaries (rounded to whole segments)


@dataclass(frozen=True)
class BackendChoice:
    """The backend and block kernel a call runs, and every fused kernel's reasons against it."""

    backend: str
    kernel: Optional[BlockKernel]
    fused_reasons: dict[str, list[str]]

    def __str__(self) -> str:
        kernel = "" if self.kernel is None else f" (block kernel: {self.kernel.name})"
        why = "; ".join(f"{k}: {', '.join(r)}" for k, r in self.fused_reasons.items() if r)
        return f"{self.backend}{kernel}" + (f" — fused path not used: {why}" if why and self.backend != "fused" else "")


def choose_backend(
    requested: str,
    query: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    dropout_p: float,
    lse_needs_grad: bool,
) -> BackendChoice:
    inputs = BlockInputs(
        device_type=query.device.type, dtype=query.dtype, head_dim=query.shape[-1],
        has_key_mask=key_padding_mask is not None, dropout=dropout_p > 0, needs_delta=lse_needs_grad and dropout_p > 0,
    )
    fused = kernel_reasons(inputs, FUSED_KERNELS)
    if torch.compiler.is_compiling():  # the gather kernel reads raw data pointers: not traceable
        fused = {name: reasons + ["under torch.compile the portable path runs"] for name, reasons in fused.items()}
    elif not triton_available():
        fused = {name: reasons + ["the fused merge needs triton (pip install triton)"] for name, reasons in fused.items()}
    if lse_needs_grad:  # the fused kernels' backward cannot take an LSE gradient
        fused = {name: reasons + ["return_lse=True with gradients needs the portable backward"]
                 for name, reasons in fused.items()}
    if requested == "reference":
        return BackendChoice("reference", None, fused)
    if requested in ("auto", "fused"):
        for kernel in FUSED_KERNELS:
            if not fused[kernel.name]:
                return BackendChoice("fused", kernel, fused)
        if requested == "fused":
            raise ValueError(f"backend='fused' cannot run these inputs: {fused}; use backend='auto' or 'portable'")
    return BackendChoice("portable", choose_kernel(inputs, KERNELS), fused)


def explain_backend(
    query: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
) -> BackendChoice:
    """What ``dilated_attention(query, ..., backend=backend)`` would run, and why not the fused path.

    The arguments are checked as ``dilated_attention`` checks them (query ``(b, n, h, d)``)."""
    V.check_qkv(query, query, query)
    key_padding_mask = V.check_key_padding_mask(key_padding_mask, query)
    dropout_p = V.check_dropout("dropout_p", dropout_p)
    return_lse = V.check_bool("return_lse", return_lse)
    backend = V.check_backend(backend)
    return choose_backend(backend, query, key_padding_mask, dropout_p, return_lse and torch.is_grad_enabled())
