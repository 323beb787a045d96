"""The dilated-attention backends as data (what each supports), the choice among them, and why the others
do not run (``explain_backend``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Collection, Optional

import torch

from . import _validation as V
from .capabilities import Backend, Support, first_supported, render_table
from .kernels import FUSED_KERNELS, KERNELS, BlockInputs, BlockKernel, choose_kernel
from .reference import REFERENCE_MAX_SCORES

__all__ = ["BACKENDS", "DILATED_BACKENDS", "PACK_TOKEN_HEADS", "BackendChoice", "backend_table", "call_inputs",
           "choose_backend", "chunk_tokens", "explain_backend"]

CHUNK_TOKENS = 1 << 17  # tokens per chunk of temporaries (rounded to whole segments)
# Packed documents on the fused path: block calls of at most this many rows x heads (a fraction of one wave
# of a large GPU) run together as one variable-length call (see .packing; BENCHMARKS.md "Packed documents").
PACK_TOKEN_HEADS = 1 << 16


def chunk_tokens(n: int) -> int:
    """Tokens per chunk of temporaries: the whole sequence up to CHUNK_TOKENS (chunks hold whole segments;
    fewer chunks issue fewer kernels, see BENCHMARKS.md)."""
    return max(1, min(CHUNK_TOKENS, n))


# The fused path: its block kernel, plus the Triton gather-merge (a torch.library op: compiled graphs hold
# it) and a backward that sums gradients in the input dtype and takes no LSE gradient.
FUSED = Backend(
    "fused", Support(lse_grad=False, packages=("triton",)) & FUSED_KERNELS[0].support,
    "cuDNN attention per block on strided views, one Triton gather-merge per chunk", FUSED_KERNELS[0],
)
PORTABLE = Backend("portable", Support(), "per block the first block kernel below that fits; fp32 merge in PyTorch ops")
REFERENCE = Backend("reference", Support(dropout=False), f"dense float64, b*h*n*n <= {REFERENCE_MAX_SCORES} scores")
DILATED_BACKENDS = (FUSED, PORTABLE, REFERENCE)
BACKENDS = ("auto",) + tuple(b.name for b in DILATED_BACKENDS)
_PRIORITY = {"auto": (FUSED, PORTABLE), "fused": (FUSED,), "portable": (PORTABLE,), "reference": (REFERENCE,)}


@dataclass(frozen=True)
class BackendChoice:
    """The backend and block kernel a call runs, and every fused kernel's reasons against it;
    :meth:`table` adds every backend and block kernel with its reasons against these inputs."""

    backend: str
    kernel: Optional[BlockKernel]
    fused_reasons: dict[str, list[str]]
    inputs: Optional[BlockInputs] = None

    def __str__(self) -> str:
        kernel = "" if self.kernel is None else f" (block kernel: {self.kernel.name})"
        why = "; ".join(f"{k}: {', '.join(r)}" for k, r in self.fused_reasons.items() if r)
        unused = f" — fused path not used: {why}" if why and self.backend != "fused" else ""
        return f"{self.backend}{kernel}{unused}"

    def table(self) -> str:
        chosen = {self.backend} | ({f"portable: {self.kernel.name}"} if self.backend == "portable" else set())
        return backend_table(self.inputs, chosen)


def backend_table(inputs: Optional[BlockInputs] = None, chosen: Collection[str] = ()) -> str:
    """Every dilated backend and block kernel: what it supports and, for ``inputs``, its reasons against them."""
    rows = [(b.name, b.support) for b in DILATED_BACKENDS] + [(f"portable: {k.name}", k.support) for k in KERNELS]
    if inputs is None:
        return render_table(rows)
    reasons = {b.name: b.not_supported_reasons(inputs) for b in DILATED_BACKENDS}
    reasons.update({f"portable: {k.name}": k.not_supported_reasons(_kernel_inputs(inputs)) for k in KERNELS})
    return render_table(rows, reasons, chosen)


def call_inputs(query: torch.Tensor, key_padding_mask: Optional[torch.Tensor], dropout_p: float,
                lse_needs_grad: bool) -> BlockInputs:
    """What the backends need to know of a call; ``lse_needs_grad``: a gradient flows into the LSE."""
    return BlockInputs(query.device.type, query.dtype, query.shape[-1], key_padding_mask is not None, dropout_p > 0,
                       lse_needs_grad)


def _kernel_inputs(inputs: BlockInputs) -> BlockInputs:
    """The portable path's block kernels: without dropout, backward switches to a kernel that takes an LSE
    gradient (delta), so only with dropout must the forward kernel take one."""
    return dataclasses.replace(inputs, needs_delta=inputs.needs_delta and inputs.dropout)


def choose_backend(
    requested: str,
    query: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    dropout_p: float,
    lse_needs_grad: bool,
) -> BackendChoice:
    """The first backend, in order of preference for ``requested``, that supports the inputs; a named
    backend that cannot run them raises a ``ValueError`` with its reasons."""
    inputs = call_inputs(query, key_padding_mask, dropout_p, lse_needs_grad)
    hint = "; use backend='auto' or 'portable'" if requested == "fused" else ""
    chosen, reasons = first_supported(_PRIORITY[requested], inputs, f"backend={requested!r} cannot run these inputs",
                                      hint=hint)
    kernel = choose_kernel(_kernel_inputs(inputs)) if chosen is PORTABLE else chosen.kernel
    fused = reasons["fused"] if "fused" in reasons else FUSED.not_supported_reasons(inputs)
    return BackendChoice(chosen.name, kernel, {FUSED.kernel.name: fused}, inputs)


def explain_backend(
    query: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
) -> BackendChoice:
    """What ``dilated_attention(query, ..., backend=backend)`` would run, and why not the fused path;
    ``.table()`` is every backend and block kernel with its reasons against these inputs.

    The arguments are checked as ``dilated_attention`` checks them (query ``(b, n, h, d)``)."""
    V.check_qkv(query, query, query)
    key_padding_mask = V.check_key_padding_mask(key_padding_mask, query)
    dropout_p = V.check_dropout("dropout_p", dropout_p)
    return_lse = V.check_bool("return_lse", return_lse)
    backend = V.check_choice("backend", backend, BACKENDS)
    return choose_backend(backend, query, key_padding_mask, dropout_p, return_lse and torch.is_grad_enabled())
