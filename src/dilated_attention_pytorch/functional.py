"""``dilated_attention``: validate, choose a backend, run (SPEC §1–2)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _validation as V
from .patterns import OffsetRule
from .backends import BackendChoice, choose_backend, chunk_tokens
from .engine import EngineOptions, run_engine
from .reference import REFERENCE_MAX_SCORES, reference_dilated_attention

__all__ = ["dilated_attention", "engine_options"]


def engine_options(query: torch.Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                   choice: BackendChoice, *, is_causal: bool, scale: float, dropout_p: float, offsets: OffsetRule,
                   head_groups: bool) -> EngineOptions:
    """The block engine's settings for validated arguments and a fused or portable ``choice``."""
    b, n, h, _ = query.shape
    return EngineOptions(
        segment_lengths=tuple(min(w, n) for w in segment_lengths), dilation_rates=tuple(dilation_rates),
        offsets=offsets, head_groups=head_groups, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
        kernel=choice.kernel, chunk_tokens=chunk_tokens(n),
        merge="triton" if choice.backend == "fused" else "torch",
        grads_in_input_dtype=choice.backend == "fused",
        piece_token_heads=max(1 << 17, b * n * h // 8),
    )


def dilated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    offsets: OffsetRule = "paper",
    head_groups: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Exact LongNet dilated attention: ``softmax(scale·QKᵀ + log C) V`` (SPEC §1).

    Args:
        query: ``(b, n, h, d)``.
        key, value: ``(b, n, h_kv, d)`` with ``h % h_kv == 0`` (grouped-query attention).
        segment_lengths, dilation_rates: the patterns ``(w_i, r_i)``; any ``n``, no divisibility needed.
        is_causal: query ``t`` sees only keys ``u <= t``.
        scale: score scale, default ``d ** -0.5``.
        dropout_p: dropout on the attention probabilities (pass 0 in evaluation).
        offsets: ``"paper"`` (default), ``"torchscale"``, ``"group"`` or explicit ``offsets[i][j]``.
        head_groups: pattern ``i`` serves only head group ``i`` instead of all heads.
        key_padding_mask: ``(b, n)`` bool, ``True`` marks padding keys that are never attended.
        return_lse: also return the log-sum-exp ``(b, h, n)`` (float32; float64 for float64 inputs).
        backend: ``"fused"`` (CUDA fp16/bf16, no padding mask or dropout: cuDNN attention per block on
            strided views, one Triton gather-merge kernel per chunk, gradients summed in the input
            dtype), ``"portable"`` (PyTorch's fused attention kernels per block on any device, fp32
            merge in PyTorch ops), ``"auto"`` (fused where it supports the
            inputs, else portable; :func:`explain_backend` says which and why), or ``"reference"``
            (dense float64, small inputs only). Fused and portable use O(n·w) memory.

    Rows that see no key get zeros, LSE ``-inf`` and no gradient.
    """
    (segment_lengths, dilation_rates, is_causal, scale, dropout_p, offsets, head_groups, key_padding_mask,
     return_lse, backend) = V.check_attention_args(
        query, key, value, segment_lengths, dilation_rates, is_causal, scale, dropout_p, offsets, head_groups,
        key_padding_mask, return_lse, backend,
    )
    if scale is None:
        scale = query.shape[-1] ** -0.5

    choice = choose_backend(backend, query, key_padding_mask, dropout_p, return_lse and torch.is_grad_enabled())
    if choice.backend == "reference":
        b, n, h, _ = query.shape
        if dropout_p > 0:
            raise ValueError(f"backend='reference' computes no dropout, but got dropout_p={dropout_p}; pass 0.0")
        if b * h * n * n > REFERENCE_MAX_SCORES:
            raise ValueError(
                f"backend='reference' builds the dense (b, h, n, n) scores, at most {REFERENCE_MAX_SCORES} "
                f"entries, but got b*h*n*n = {b * h * n * n}; use backend='portable'"
            )
        out, lse = reference_dilated_attention(
            query, key, value, segment_lengths, dilation_rates, is_causal=is_causal, scale=scale,
            offsets=offsets, head_groups=head_groups, key_padding_mask=key_padding_mask,
        )
        out = out.to(query.dtype)
        lse = lse if query.dtype == torch.float64 else lse.float()
    else:
        opts = engine_options(query, segment_lengths, dilation_rates, choice, is_causal=is_causal, scale=scale,
                              dropout_p=dropout_p, offsets=offsets, head_groups=head_groups)
        key_valid = None if key_padding_mask is None else ~key_padding_mask
        out, lse_bnh = run_engine(query, key, value, key_valid, opts)
        lse = lse_bnh.transpose(1, 2)
    return (out, lse) if return_lse else out
