"""``dilated_attention``: check the arguments once (:func:`attention_args`), then :func:`attend`: choose a
backend and run it. What it computes: README, "What it computes"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import _validation as V
from .backends import BACKENDS, BackendChoice, choose_backend, chunk_tokens
from .engine import EngineOptions, run_engine
from .patterns import OffsetRule
from .reference import REFERENCE_MAX_SCORES, reference_dilated_attention

__all__ = ["AttentionArgs", "attend", "attention_args", "dilated_attention", "engine_options"]


@dataclass(frozen=True)
class AttentionArgs:
    """The checked, normalised settings of a dilated-attention call (its tensors go beside them)."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    is_causal: bool
    scale: float  # d ** -0.5 when not given
    dropout_p: float
    offsets: OffsetRule  # a rule name, or explicit offsets as tuples
    head_groups: bool
    return_lse: bool
    backend: str


def attention_args(
    query, key, value, segment_lengths, dilation_rates, *, is_causal, scale, dropout_p, offsets, head_groups,
    key_padding_mask, return_lse, backend, backends: Sequence[str] = BACKENDS,
) -> AttentionArgs:
    """Every argument of ``dilated_attention`` (and of its sequence-parallel forms), checked once:
    ``query``, ``key``, ``value`` and ``key_padding_mask`` are checked, the settings returned."""
    V.check_qkv(query, key, value)
    segment_lengths, dilation_rates = V.check_patterns(segment_lengths, dilation_rates)
    head_groups = V.check_bool("head_groups", head_groups)
    is_causal = V.check_bool("is_causal", is_causal)
    scale = V.check_scale("scale", scale)
    dropout_p = V.check_dropout("dropout_p", dropout_p)
    offsets = V.check_offsets(offsets, dilation_rates, query.shape[2], head_groups)
    V.check_key_padding_mask(key_padding_mask, query)
    return AttentionArgs(
        segment_lengths, dilation_rates, is_causal, query.shape[-1] ** -0.5 if scale is None else scale, dropout_p,
        offsets, head_groups, V.check_bool("return_lse", return_lse), V.check_choice("backend", backend, backends),
    )


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


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    args: AttentionArgs,
    choice: Optional[BackendChoice] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention on checked arguments -> ``(out (b, n, h, d), lse (b, h, n))``. ``choice``: the
    backend chosen for these inputs (callers that run several pieces of one call choose once)."""
    if choice is None:
        lse_needs_grad = args.return_lse and torch.is_grad_enabled()
        choice = choose_backend(args.backend, query, key_padding_mask, args.dropout_p, lse_needs_grad)
    if choice.backend == "reference":
        b, n, h, _ = query.shape
        if b * h * n * n > REFERENCE_MAX_SCORES:
            raise ValueError(
                f"backend='reference' builds the dense (b, h, n, n) scores, at most {REFERENCE_MAX_SCORES} "
                f"entries, but got b*h*n*n = {b * h * n * n}; use backend='portable'"
            )
        out, lse = reference_dilated_attention(
            query, key, value, args.segment_lengths, args.dilation_rates, is_causal=args.is_causal, scale=args.scale,
            offsets=args.offsets, head_groups=args.head_groups, key_padding_mask=key_padding_mask,
        )
        return out.to(query.dtype), lse if query.dtype == torch.float64 else lse.float()
    opts = engine_options(query, args.segment_lengths, args.dilation_rates, choice, is_causal=args.is_causal,
                          scale=args.scale, dropout_p=args.dropout_p, offsets=args.offsets,
                          head_groups=args.head_groups)
    key_valid = None if key_padding_mask is None else ~key_padding_mask
    out, lse_bnh = run_engine(query, key, value, key_valid, opts)
    return out, lse_bnh.transpose(1, 2)


def dilated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_lengths: Sequence[int],
    dilation_rates: Sequence[int], *, is_causal: bool = False, scale: Optional[float] = None, dropout_p: float = 0.0,
    offsets: OffsetRule = "paper", head_groups: bool = False, key_padding_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False, backend: str = "auto",
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Exact LongNet dilated attention: ``softmax(scale·QKᵀ + log C) V`` (README, "What it computes").

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
    args = attention_args(
        query, key, value, segment_lengths, dilation_rates, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
        offsets=offsets, head_groups=head_groups, key_padding_mask=key_padding_mask, return_lse=return_lse,
        backend=backend,
    )
    out, lse = attend(query, key, value, key_padding_mask, args)
    return (out, lse) if args.return_lse else out
