"""Blockwise attention in plain PyTorch: any device and dtype, key masks, dropout, explicit delta.

Queries are processed in chunks so that memory stays O(chunk · L), never O(L²) at once. Scores and
probabilities are computed in float32 (float64 for float64 inputs). Dropout masks are drawn from a
generator seeded per chunk, so backward regenerates exactly the masks forward used.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..capabilities import Declared, Support
from .base import acc_dtype, inert_padding

__all__ = ["MathKernel"]

_CHUNK_ELEMENTS = 1 << 24  # scores held at once: B*H*chunk*L


class MathKernel(Declared):
    name = "math"
    support = Support()  # any device and dtype, key masks, dropout, an explicit delta

    @staticmethod
    def _chunk(q: torch.Tensor) -> int:
        b, h, length, _ = q.shape
        return max(1, min(length, _CHUNK_ELEMENTS // max(1, b * h * length)))

    @staticmethod
    def _allowed(key_valid, is_causal, rows: slice, length: int, device) -> Optional[torch.Tensor]:
        """Bool (B or 1, 1, rows, L) of allowed query-key pairs, or None when all are allowed."""
        allowed = None
        if is_causal:
            t = torch.arange(rows.start, rows.stop, device=device)[:, None]
            u = torch.arange(length, device=device)[None, :]
            allowed = (u <= t)[None, None]
        if key_valid is not None:
            kv = key_valid[:, None, None, :]
            allowed = kv if allowed is None else allowed & kv
        return allowed

    @staticmethod
    def _dropout_keep(shape, p: float, seed: int, chunk_index: int, device) -> torch.Tensor:
        gen = torch.Generator(device=device)
        gen.manual_seed((seed * 1_000_003 + chunk_index) % (2**63))
        return torch.rand(shape, generator=gen, device=device) >= p

    def _probs(self, q, k, lse_rows, allowed, scale):
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        p = torch.exp(s - lse_rows[..., None])
        return p if allowed is None else p.masked_fill(~allowed, 0.0)

    def forward(self, q, k, v, *, key_valid, is_causal, scale, dropout_p,
                padding_finite=False) -> tuple[torch.Tensor, torch.Tensor, Any]:
        acc = acc_dtype(q.dtype)
        q, k, v = inert_padding(q, k, v, key_valid, is_causal, padding_finite)
        qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
        length = q.shape[2]
        step = self._chunk(q)
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
        outs, lses = [], []
        for ci, start in enumerate(range(0, length, step)):
            rows = slice(start, min(length, start + step))
            s = torch.matmul(qf[:, :, rows], kf.transpose(-1, -2)) * scale
            allowed = self._allowed(key_valid, is_causal, rows, length, q.device)
            if allowed is not None:
                s = s.masked_fill(~allowed, float("-inf"))
            # normalised by the sum itself, not by exp(lse): the LSE is rounded at ulp(lse), which at
            # large logits would reach every probability; the max propagates NaN, -inf is "no keys"
            top = s.amax(-1, keepdim=True)
            e = torch.exp(s - top.masked_fill(top == float("-inf"), 0.0))
            total = e.sum(-1, keepdim=True)
            lse = (top + torch.log(total)).squeeze(-1)  # -inf + log 0 = -inf for rows with no keys
            p = e / total.masked_fill(total == 0, 1.0)
            if dropout_p > 0:
                p = p * self._dropout_keep(p.shape, dropout_p, seed, ci, q.device) / (1.0 - dropout_p)
            outs.append(torch.matmul(p, vf))
            lses.append(lse)
        return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2), seed

    def backward(self, dout, q, k, v, out, lse, rng_state, *, key_valid, is_causal, scale, dropout_p, delta,
                 padding_finite=False):
        acc = acc_dtype(q.dtype)
        q, k, v = inert_padding(q, k, v, key_valid, is_causal, padding_finite)
        qf, kf, vf, dof = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
        if delta is None:
            delta = (dof * out.to(acc)).sum(-1)
        length = q.shape[2]
        step = self._chunk(q)
        dq = torch.empty_like(qf)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        for ci, start in enumerate(range(0, length, step)):
            rows = slice(start, min(length, start + step))
            allowed = self._allowed(key_valid, is_causal, rows, length, q.device)
            p = self._probs(qf[:, :, rows], kf, lse[:, :, rows].to(acc), allowed, scale)
            dp = torch.matmul(dof[:, :, rows], vf.transpose(-1, -2))
            if dropout_p > 0:
                keep = self._dropout_keep(p.shape, dropout_p, rng_state, ci, q.device) / (1.0 - dropout_p)
                dv += torch.matmul((p * keep).transpose(-1, -2), dof[:, :, rows])
                dp = dp * keep
            else:
                dv += torch.matmul(p.transpose(-1, -2), dof[:, :, rows])
            ds = p * (dp - delta[:, :, rows, None].to(acc))
            dq[:, :, rows] = torch.matmul(ds, kf) * scale
            dk += torch.matmul(ds.transpose(-1, -2), qf[:, :, rows]) * scale
        return dq, dk, dv
