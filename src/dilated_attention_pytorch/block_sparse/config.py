"""``SparsePatternConfig``: names a block layout and its parameters; ``build`` makes the layout."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .. import _validation as V
from . import layouts as L

__all__ = ["PATTERNS", "SparsePatternConfig"]

PATTERNS = ("local", "dilated", "global_local", "strided", "random", "hierarchical", "mask_mod", "layout", "adaptive")


@dataclass(frozen=True)
class SparsePatternConfig:
    """Which layout to build, in blocks (``window``, ``stride``, ``levels``, ``global_blocks``) or, for
    ``"dilated"``, in tokens (``segment_lengths`` multiples of the block size; ``dilation_rates`` count
    blocks; ``None`` takes the attention module's own patterns).

    Patterns: ``"local"`` (``window``), ``"dilated"`` (``segment_lengths``, ``dilation_rates``,
    ``offsets``, ``head_groups``), ``"global_local"`` (``window``, ``global_blocks``), ``"strided"``
    (``stride``, ``window``), ``"random"`` (``density``, ``seed``), ``"hierarchical"`` (``levels``),
    ``"mask_mod"`` (``mask_mod``), ``"layout"`` (``layout``, a fixed bool tensor), ``"adaptive"``
    (``top_k``; built from each call's queries and keys, see :func:`~.layouts.adaptive_layout`).
    """

    pattern: str = "dilated"
    window: int = 1
    global_blocks: Union[int, Sequence[int]] = 1
    stride: int = 4
    density: float = 0.1
    seed: int = 0
    levels: Sequence[tuple[int, int]] = ((1, 1), (2, 4))
    top_k: int = 4
    segment_lengths: Optional[Sequence[int]] = None
    dilation_rates: Optional[Sequence[int]] = None
    offsets: Union[str, Sequence[Sequence[int]]] = "paper"
    head_groups: bool = False
    mask_mod: Optional[Callable] = field(default=None, compare=False)
    layout: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, but got {self.pattern!r}")
        V.check_int("window", self.window, minimum=0)
        V.check_int("stride", self.stride)
        V.check_int("seed", self.seed, minimum=0)
        V.check_int("top_k", self.top_k)
        if isinstance(self.density, bool) or not isinstance(self.density, numbers.Real) or not 0 <= self.density <= 1:
            raise ValueError(f"density must be a float in [0, 1], but got {self.density!r}")
        if (self.segment_lengths is None) != (self.dilation_rates is None):
            raise ValueError("segment_lengths and dilation_rates must be given together or both be None")
        if self.segment_lengths is not None:
            ws, rs = V.check_patterns(self.segment_lengths, self.dilation_rates)
            object.__setattr__(self, "segment_lengths", ws)
            object.__setattr__(self, "dilation_rates", rs)
        if isinstance(self.levels, list):
            object.__setattr__(self, "levels", tuple(tuple(level) for level in self.levels))
        if isinstance(self.global_blocks, list):
            object.__setattr__(self, "global_blocks", tuple(self.global_blocks))
        if self.pattern == "mask_mod" and not callable(self.mask_mod):
            raise ValueError("pattern='mask_mod' needs mask_mod=a callable (b, h, q_idx, kv_idx) -> bool")
        if self.pattern == "layout" and not isinstance(self.layout, torch.Tensor):
            raise ValueError("pattern='layout' needs layout=a bool tensor (heads or 1, nb, nb)")
        if self.mask_mod is not None and self.pattern != "mask_mod":
            raise ValueError(f"mask_mod is used only with pattern='mask_mod', but pattern={self.pattern!r}")
        if self.layout is not None and self.pattern != "layout":
            raise ValueError(f"layout is used only with pattern='layout', but pattern={self.pattern!r}")

    @property
    def content_dependent(self) -> bool:
        """Whether the layout depends on the inputs (it is rebuilt on every call)."""
        return self.pattern == "adaptive"

    def build(
        self,
        seq_len: int,
        num_heads: int,
        block_size: int,
        *,
        device: Optional[torch.device] = None,
        segment_lengths: Optional[Sequence[int]] = None,
        dilation_rates: Optional[Sequence[int]] = None,
        query: Optional[torch.Tensor] = None,
        key: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """The layout ``(num_heads or 1, nb, nb)`` for ``seq_len`` tokens. ``segment_lengths`` and
        ``dilation_rates`` are the module's patterns (used by ``"dilated"`` when the config has none);
        ``query``/``key`` are needed by ``"adaptive"``."""
        n = V.check_int("seq_len", seq_len)
        bs = V.check_int("block_size", block_size)
        nb = -(-n // bs)
        p = self.pattern
        if p == "local":
            return L.local_window_layout(nb, self.window, device=device)
        if p == "dilated":
            ws = self.segment_lengths if self.segment_lengths is not None else segment_lengths
            rs = self.dilation_rates if self.dilation_rates is not None else dilation_rates
            if ws is None:
                raise ValueError("pattern='dilated' needs segment_lengths and dilation_rates")
            bad = [w for w in ws if w % bs != 0]
            if bad:
                raise ValueError(
                    f"pattern='dilated' needs segment_lengths that are multiples of block_size={bs}, but got {bad}"
                )
            return L.dilated_layout(
                nb, num_heads, [w // bs for w in ws], rs, offsets=self.offsets, head_groups=self.head_groups,
                device=device,
            )
        if p == "global_local":
            return L.global_local_layout(nb, self.window, self.global_blocks, device=device)
        if p == "strided":
            return L.strided_layout(nb, self.stride, window=self.window, device=device)
        if p == "random":
            return L.random_layout(nb, self.density, num_heads=num_heads, seed=self.seed, device=device)
        if p == "hierarchical":
            return L.hierarchical_layout(nb, self.levels, device=device)
        if p == "mask_mod":
            return L.layout_from_mask_mod(
                self.mask_mod, n, bs, num_heads=num_heads, is_causal=is_causal, device=device
            )
        if p == "layout":
            return self.layout.to(device)
        if query is None or key is None:
            raise ValueError("pattern='adaptive' needs the query and key to score blocks")
        return L.adaptive_layout(query, key, bs, self.top_k, is_causal=is_causal)
