"""Rotary position embeddings (RoPE) and XPOS, applied to query/key heads at absolute positions."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["POSITION_KINDS", "RotaryEmbedding", "document_positions"]

POSITION_KINDS = ("rotary", "xpos")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d): pairs (x_i, x_{i+d/2}) -> (-x_{i+d/2}, x_i)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def document_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Each token's position inside its packed document ``(total,)`` (int64): 0 at every document start."""
    cu = cu_seqlens.long()
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return torch.arange(total, device=cu.device) - starts


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) or XPOS (Sun et al. 2022) on ``(b, n, h, d)`` heads at positions ``start..start+n-1``.

    XPOS multiplies query pair ``i`` at position ``t`` by ``ζ_i^(t/scale_base)`` and key pair ``i`` at
    position ``u`` by ``ζ_i^(-u/scale_base)``, ``ζ_i = (2i/d + γ)/(1 + γ)``, ``γ = 0.4``: the score then
    decays with ``t - u`` only, so absolute positions are used (no centring), which keeps incremental
    decoding exact. The factors are computed in float64; positions beyond :attr:`max_position` would
    overflow the query/key dtype and raise ``ValueError``.
    Nothing is cached: the angles are recomputed per call (cheap, and ``torch.compile`` friendly).
    """

    def __init__(self, head_dim: int, *, kind: str = "rotary", base: float = 10000.0, xpos_scale_base: float = 512.0):
        super().__init__()
        if kind not in POSITION_KINDS:
            raise ValueError(f"positions must be one of {POSITION_KINDS}, but got {kind!r}")
        if head_dim % 2 != 0:
            raise ValueError(f"rotary positions need an even head_dim, but got head_dim={head_dim}")
        if not base > 1.0:
            raise ValueError(f"rotary base must be > 1, but got {base}")
        if not xpos_scale_base > 0:
            raise ValueError(f"xpos_scale_base must be > 0, but got {xpos_scale_base}")
        self.head_dim, self.kind, self.base, self.xpos_scale_base = head_dim, kind, float(base), float(xpos_scale_base)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, kind={self.kind!r}, base={self.base}"

    def _zeta(self, device) -> torch.Tensor:
        half = self.head_dim // 2
        gamma = 0.4
        return (torch.arange(half, device=device, dtype=torch.float64) * 2 / self.head_dim + gamma) / (1 + gamma)

    @property
    def max_position(self) -> float:
        """XPOS: the largest position whose key factor stays below 1e30 (float32 safe); rotary: inf."""
        if self.kind != "xpos":
            return math.inf
        zeta_min = (0.4) / 1.4
        return 30 * math.log(10) / -math.log(zeta_min) * self.xpos_scale_base

    def forward(self, q: torch.Tensor, k: torch.Tensor, start: int = 0,
                positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``(b, n, h, d)``, k ``(b, n, h_kv, d)`` at positions ``start..start+n-1``, or at ``positions
        (n,)`` (e.g. :func:`document_positions` of packed documents: each restarts at 0)."""
        n = q.shape[1]
        device = q.device
        if positions is None:
            last = start + n
            pos = torch.arange(start, start + n, device=device, dtype=torch.float64)  # (n,)
        else:
            last = n  # a position inside a document of at most n tokens
            pos = positions.to(device=device, dtype=torch.float64)
        if self.kind == "xpos" and last > self.max_position:
            raise ValueError(
                f"xpos positions up to {last} exceed max_position={self.max_position:.0f} for "
                f"xpos_scale_base={self.xpos_scale_base}; raise xpos_scale_base or use positions='rotary'"
            )
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim)
        angles = pos[:, None] * inv_freq[None, :]  # (n, d/2)
        cos = torch.cat((angles.cos(), angles.cos()), -1)[None, :, None, :]  # (1, n, 1, d)
        sin = torch.cat((angles.sin(), angles.sin()), -1)[None, :, None, :]
        if self.kind == "xpos":
            scale = self._zeta(device)[None, :] ** (pos[:, None] / self.xpos_scale_base)  # (n, d/2)
            scale = torch.cat((scale, scale), -1)[None, :, None, :]  # (1, n, 1, d)
            cos_q, sin_q, cos_k, sin_k = cos * scale, sin * scale, cos / scale, sin / scale
        else:
            cos_q, sin_q, cos_k, sin_k = cos, sin, cos, sin
        cast = lambda t, x: t.to(x.dtype)  # noqa: E731
        q_out = q * cast(cos_q, q) + _rotate_half(q) * cast(sin_q, q)
        k_out = k * cast(cos_k, k) + _rotate_half(k) * cast(sin_k, k)
        return q_out, k_out
