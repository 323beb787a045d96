"""Argument checks shared by every public entry point. Each message names the argument, the value
and the rule it breaks."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch

from .patterns import OFFSET_RULES, head_groups_of


def _scalar(value: Any) -> Any:
    """A 0-d tensor's Python number (``torch.tensor(3)`` -> 3); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        return value.item()
    return value


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """An int >= ``minimum``: Python, NumPy and 0-d torch integers alike (not bools)."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, but got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, but got {value}")
    return int(value)


def check_float(name: str, value: Any, *, minimum: float, inclusive: bool = True) -> float:
    """A finite real number >= ``minimum`` (> when not ``inclusive``): Python, NumPy, 0-d torch numbers."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, but got {value!r} of type {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x) or x < minimum or (x == minimum and not inclusive):
        rule = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ValueError(f"{name} must be a finite number {rule}, but got {value!r}")
    return x


def check_dense(name: str, t: torch.Tensor) -> None:
    """A strided dense tensor: not sparse, not nested (their storage cannot be viewed the way we do)."""
    if t.layout != torch.strided or t.is_nested:
        kind = "nested" if t.is_nested else str(t.layout)
        raise TypeError(f"{name} must be a dense (torch.strided) tensor, but got a {kind} tensor; call .to_dense()")


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, but got {value!r} of type {type(value).__name__}")
    return value


def check_dropout(name: str, value: Any) -> float:
    """A probability in [0, 1)."""
    p = check_float(name, value, minimum=0.0)
    if p >= 1.0:
        raise ValueError(f"{name} must be in [0, 1), but got {value!r}")
    return p


def check_scale(name: str, value: Any) -> Optional[float]:
    """None (the default scale) or a finite number > 0."""
    return None if value is None else check_float(name, value, minimum=0.0, inclusive=False)


def check_patterns(segment_lengths: Any, dilation_rates: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """segment_lengths and dilation_rates: non-empty sequences of positive ints, same length, r <= w."""
    for name, value in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a sequence of ints, but got {value!r}")
        if len(value) == 0:
            raise ValueError(f"{name} must not be empty")
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            "segment_lengths and dilation_rates must have the same length, but got "
            f"{len(segment_lengths)} segment lengths {list(segment_lengths)} and "
            f"{len(dilation_rates)} dilation rates {list(dilation_rates)}"
        )
    ws = tuple(check_int(f"segment_lengths[{i}]", w) for i, w in enumerate(segment_lengths))
    rs = tuple(check_int(f"dilation_rates[{i}]", r) for i, r in enumerate(dilation_rates))
    for i, (w, r) in enumerate(zip(ws, rs)):
        if r > w:
            raise ValueError(
                f"dilation_rates[{i}] must be <= segment_lengths[{i}], but got dilation {r} > segment {w}"
            )
    return ws, rs


def check_offsets(offsets: Any, dilation_rates: Sequence[int], num_heads: Optional[int], head_groups: bool) -> Any:
    """A rule name, or offsets[i][j] with values in [0, r_i); j indexes the heads that use pattern i
    (or all heads). Without num_heads, the lengths (and head groups: at least one head per pattern)
    are checked later, once the heads are known."""
    users = None if num_heads is None else head_groups_of(num_heads, len(dilation_rates), head_groups)
    if isinstance(offsets, str):
        if offsets not in OFFSET_RULES:
            raise ValueError(f"offsets must be one of {OFFSET_RULES} or a list of lists, but got {offsets!r}")
        return offsets
    if not isinstance(offsets, Sequence) or len(offsets) != len(dilation_rates):
        raise ValueError(
            f"explicit offsets must be a list with one list per pattern ({len(dilation_rates)}), "
            f"but got {offsets!r}"
        )
    rows = []
    for i, (row, r) in enumerate(zip(offsets, dilation_rates)):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"offsets[{i}] must be a list of ints, but got {row!r}")
        for j, o in enumerate(row):
            check_int(f"offsets[{i}][{j}]", o, minimum=0)
            if o >= r:
                raise ValueError(f"offsets[{i}][{j}] must be in [0, dilation_rates[{i}]={r}), but got {o}")
        rows.append(tuple(int(o) for o in row))
    if users is not None:
        for i, row in enumerate(rows):
            if len(row) not in (len(users[i]), num_heads):
                raise ValueError(
                    f"offsets[{i}] must have one entry per head that uses pattern {i} ({len(users[i])}) "
                    f"or per head ({num_heads}), but got {len(row)} entries"
                )
    return tuple(rows)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices`` (e.g. a backend name)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, but got {value!r}")
    return value


LAYOUT_HINT = (
    "; tensors are (batch, seq, heads, head_dim), not (batch, heads, seq, head_dim) as for "
    "F.scaled_dot_product_attention: convert those with .transpose(1, 2)"
)


def check_qkv(query: Any, key: Any, value: Any) -> None:
    """query (b, n, h, d); key and value (b, n, h_kv, d) with h % h_kv == 0. A shape mismatch names the
    dimension that differs and reminds of the layout (a (b, h, n, d) tensor is caught only when the
    shapes disagree: every 4-d shape is a valid (b, n, h, d))."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, but got {type(t).__name__}")
        check_dense(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim), but got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, but got dtype {t.dtype}")
        if t.numel() == 0 and t.shape[1] != 0:
            raise ValueError(f"{name} must not be empty, but got shape {tuple(t.shape)}")
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, but got {tuple(key.shape)} and {tuple(value.shape)}")
    b, n, h, d = query.shape
    kb, kn, kh, kd = key.shape
    if kb != b:
        raise ValueError(f"query and key must have the same batch size, but query has {b} and key {kb}{LAYOUT_HINT}")
    if kn != n:
        raise ValueError(
            f"query and key must have the same sequence length (dim 1), but query has {n} tokens and key {kn}: "
            f"dilated attention is self-attention over one sequence{LAYOUT_HINT}"
        )
    if kd != d:
        raise ValueError(f"query and key must have the same head_dim (dim 3), but got {d} and {kd}{LAYOUT_HINT}")
    if n == 0:
        raise ValueError("query must have at least one token (seq >= 1), but got seq = 0")
    if h % key.shape[2] != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kh}){LAYOUT_HINT}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must have one dtype, but got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, but got {query.device}, {key.device}, {value.device}"
        )


def check_key_padding_mask(mask: Any, query: torch.Tensor) -> Optional[torch.Tensor]:
    """(b, n) bool, True = padding (as in nn.MultiheadAttention)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor or None, but got {type(mask).__name__}")
    check_dense("key_padding_mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True = padding), but got {mask.dtype}")
    expected = (query.shape[0], query.shape[1])
    if tuple(mask.shape) != expected:
        hint = ""
        if mask.shape == expected[::-1]:
            hint = " (inputs laid out (seq, batch, ...)? multihead modules take those with batch_first=False)"
        raise ValueError(
            f"key_padding_mask must have shape (batch, seq) = {expected}, but got {tuple(mask.shape)}{hint}"
        )
    if mask.device != query.device:
        raise ValueError(f"key_padding_mask must be on the device of query ({query.device}), but got {mask.device}")
    return mask


def check_cu_seqlens(cu_seqlens: Any, total: int, device: torch.device,
                     max_seqlen: Any = None) -> tuple[tuple[int, int], ...]:
    """Packed documents: ``cu_seqlens`` an int32/int64 tensor ``(B+1,)`` on ``device``, 0 first, strictly
    increasing, ``total`` last -> the documents ``((start, stop), ...)``. Reads it on the host (one sync).
    ``max_seqlen`` (optional): an int at least the longest document."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32/int64 tensor, but got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have dtype torch.int32 or torch.int64, but got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape (documents + 1,) with at least 2 entries, but got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the device of query ({device}), but got {cu_seqlens.device}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, but got cu_seqlens[0] = {cu[0]}")
    bad = next((i for i in range(1, len(cu)) if cu[i] <= cu[i - 1]), None)
    if bad is not None:
        raise ValueError(f"cu_seqlens must be strictly increasing (documents of at least one token), but got "
                         f"cu_seqlens[{bad - 1}] = {cu[bad - 1]} and cu_seqlens[{bad}] = {cu[bad]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at the number of packed tokens ({total}), but got cu_seqlens[-1] = "
                         f"{cu[-1]}")
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    if max_seqlen is not None and check_int("max_seqlen", max_seqlen) < longest:
        raise ValueError(f"max_seqlen must be at least the longest document ({longest} tokens), but got {max_seqlen}")
    return tuple(zip(cu, cu[1:]))


def check_sequence_starts(starts: Any, b: int, n: int) -> tuple[int, ...]:
    """Per batch row the first valid position (left padding): ints in ``[0, n]``, ``(b,)`` (a sequence
    or an integer tensor, read on the host)."""
    if isinstance(starts, torch.Tensor):
        if starts.dtype.is_floating_point or starts.dtype == torch.bool or starts.is_complex():
            raise TypeError(f"sequence_starts must be an integer tensor, but got dtype {starts.dtype}")
        if starts.dim() != 1:
            raise ValueError(f"sequence_starts must have shape (batch,) = ({b},), but got shape {tuple(starts.shape)}")
        starts = starts.tolist()
    elif isinstance(starts, (str, bytes)) or not isinstance(starts, Sequence):
        raise TypeError(f"sequence_starts must be a sequence of ints or an integer tensor, but got {starts!r}")
    if len(starts) != b:
        raise ValueError(f"sequence_starts must have one entry per batch row ({b}), but got {len(starts)}")
    values = tuple(check_int(f"sequence_starts[{i}]", s, minimum=0) for i, s in enumerate(starts))
    for i, s in enumerate(values):
        if s > n:
            raise ValueError(f"sequence_starts[{i}] must be in [0, seq={n}], but got {s}")
    return values
