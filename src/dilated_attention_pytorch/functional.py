"""``dilated_attention``: check the arguments once (:func:`attention_args`), then :func:`attend`: choose a
backend and run it. What it computes: README, "What it computes"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import _validation as V
from .backends import BACKENDS, PACK_TOKEN_HEADS, BackendChoice, choose_backend, chunk_tokens
from .engine import Documents, EngineOptions, run_engine
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
        pack_token_heads=PACK_TOKEN_HEADS if choice.backend == "fused" else 0,
    )


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    args: AttentionArgs,
    choice: Optional[BackendChoice] = None,
    documents: Optional[Documents] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention on checked arguments -> ``(out (b, n, h, d), lse (b, h, n))``. ``choice``: the
    backend chosen for these inputs (callers that run several pieces of one call choose once).
    ``documents``: per batch row its documents ``[start, stop)``, each its own sequence (rows in none:
    zeros, LSE ``-inf``); None: each row is one sequence."""
    if choice is None:
        lse_needs_grad = args.return_lse and torch.is_grad_enabled()
        choice = choose_backend(args.backend, query, key_padding_mask, args.dropout_p, lse_needs_grad)
    if choice.backend == "reference":
        if documents is None:
            return _reference(query, key, value, key_padding_mask, args)
        out = torch.zeros_like(query)
        lse = torch.full((query.shape[0], query.shape[2], query.shape[1]), float("-inf"),
                         dtype=torch.float64 if query.dtype == torch.float64 else torch.float32, device=query.device)
        for i, row in enumerate(documents):
            for s, e in row:
                part = [x[i:i + 1, s:e] for x in (query, key, value)]
                mask = None if key_padding_mask is None else key_padding_mask[i:i + 1, s:e]
                out[i:i + 1, s:e], lse[i:i + 1, :, s:e] = _reference(*part, mask, args)
        return out, lse
    opts = engine_options(query, args.segment_lengths, args.dilation_rates, choice, is_causal=args.is_causal,
                          scale=args.scale, dropout_p=args.dropout_p, offsets=args.offsets,
                          head_groups=args.head_groups)
    key_valid = None if key_padding_mask is None else ~key_padding_mask
    out, lse_bnh = run_engine(query, key, value, key_valid, opts, documents)
    return out, lse_bnh.transpose(1, 2)


def _reference(query, key, value, key_padding_mask, args: AttentionArgs) -> tuple[torch.Tensor, torch.Tensor]:
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


def _documents(query: torch.Tensor, cu_seqlens, max_seqlen, sequence_starts) -> Optional[Documents]:
    """The documents of a call with ``cu_seqlens`` (``query (1, total, h, d)``, packed) or
    ``sequence_starts`` (row ``i`` is ``[start_i, n)``), checked; None without either."""
    if max_seqlen is not None and cu_seqlens is None:
        raise ValueError(f"max_seqlen is for packed documents: pass cu_seqlens too (got max_seqlen={max_seqlen!r})")
    if cu_seqlens is not None:
        if sequence_starts is not None:
            raise ValueError("pass cu_seqlens (packed documents) or sequence_starts (left padding), not both")
        return (V.check_cu_seqlens(cu_seqlens, query.shape[1], query.device, max_seqlen),)
    if sequence_starts is None:
        return None
    b, n = query.shape[:2]
    starts = V.check_sequence_starts(sequence_starts, b, n)
    if not any(starts):  # every row starts at 0: the plain call (one group per chunk over the batch)
        return None
    return tuple(((s, n),) if s < n else () for s in starts)


def _unpack(query, key, value, key_padding_mask):
    """Packed ``(total, h, d)`` tensors (and a ``(total,)`` padding mask) as one batch row."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"with cu_seqlens (packed documents), {name} must have shape (total, heads, head_dim), "
                             f"but got {shape}")
    if isinstance(key_padding_mask, torch.Tensor):
        if key_padding_mask.dim() != 1:
            raise ValueError(f"with cu_seqlens (packed documents), key_padding_mask must have shape (total,) = "
                             f"({query.shape[0]},), but got {tuple(key_padding_mask.shape)}")
        key_padding_mask = key_padding_mask.unsqueeze(0)
    return query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), key_padding_mask


def dilated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_lengths: Sequence[int],
    dilation_rates: Sequence[int], *, is_causal: bool = False, scale: Optional[float] = None, dropout_p: float = 0.0,
    offsets: OffsetRule = "paper", head_groups: bool = False, key_padding_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False, backend: str = "auto", cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None, sequence_starts=None,
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
        cu_seqlens: packed documents (flash-attn's varlen layout): ``query (total, h, d)``, ``key``/``value
            (total, h_kv, d)``, ``key_padding_mask (total,)``, and ``cu_seqlens`` an int32/int64 tensor
            ``(documents + 1,)`` of document starts, 0 first and ``total`` last. Each document is its own
            sequence: its segments start at its first token, ``W_i = min(w_i, its length)``, and it sees no
            other document's key. Output ``(total, h, d)``, LSE ``(h, total)``. Reading ``cu_seqlens`` costs
            one host sync (as flash-attn's ``max_seqlen``); each set of document lengths builds its plan
            once (a bounded LRU cache).
        max_seqlen: optional with ``cu_seqlens``: checked to be at least the longest document.
        sequence_starts: ``(b,)`` ints (a sequence or a tensor, one host sync): row ``i`` is the sequence
            ``[start_i, n)`` (left padding): it equals that sequence unpadded; the positions before
            ``start_i`` output zeros with LSE ``-inf`` and are nobody's keys.

    Rows that see no key get zeros, LSE ``-inf`` and no gradient.
    """
    packed = cu_seqlens is not None
    if packed:
        query, key, value, key_padding_mask = _unpack(query, key, value, key_padding_mask)
    args = attention_args(
        query, key, value, segment_lengths, dilation_rates, is_causal=is_causal, scale=scale, dropout_p=dropout_p,
        offsets=offsets, head_groups=head_groups, key_padding_mask=key_padding_mask, return_lse=return_lse,
        backend=backend,
    )
    documents = _documents(query, cu_seqlens, max_seqlen, sequence_starts)
    out, lse = attend(query, key, value, key_padding_mask, args, documents=documents)
    if packed:
        out, lse = out[0], lse[0]
    return (out, lse) if args.return_lse else out
