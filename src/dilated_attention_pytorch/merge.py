"""The log-sum-exp merge of partial attention results: one place, used by every path.

Partials are weighted relative to the largest LSE of a row, never relative to the merged LSE: with
``m = max_i l_i``, ``w_i = exp(l_i - m)`` (one weight is exactly 1), ``out = Σ w_i O_i / Σ w_i`` and
``lse = m + log Σ w_i``. The merged LSE is rounded to the dtype at the magnitude of ``m``; a weight
``exp(l_i - lse)`` would carry that rounding (``ulp(lse)``, 5e-4 at ``|lse| = 7e3`` in float32) into
every output, whereas ``l_i - m`` is exact when the two are close.

A row with LSE ``-inf`` has no keys and contributes nothing; a NaN LSE is not "no keys": it propagates
(NaN output and LSE), as NaN inputs do in PyTorch's attention.

The exact backward of a merge (:func:`backward_stats`) runs each partial's kernel backward with
``lse = m`` and the incoming gradient divided by ``Σ w_i``: ``exp(S - m) / Σ w_i = exp(S - lse)``,
without the merged LSE's rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["backward_stats", "finish_merge", "lse_shift", "merge_step"]


def lse_shift(lse_max: torch.Tensor) -> torch.Tensor:
    """The shift of a merge: the largest LSE of each row, 0 where it is ``-inf`` (no keys; every
    weight is then ``exp(-inf) = 0``). NaN stays NaN."""
    return lse_max.masked_fill(lse_max == float("-inf"), 0.0)


def finish_merge(out_sum: torch.Tensor, shift: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ w_i O_i (..., D), shift (...), Σ w_i (...))`` -> ``(out, lse)``; rows without keys (total 0)
    give zeros and ``-inf``; NaN rows give NaN."""
    out = out_sum / total.masked_fill(total == 0, 1.0).unsqueeze(-1)
    return out, shift + torch.log(total)  # log(0) = -inf for rows with no keys


def backward_stats(
    shift: torch.Tensor, total: torch.Tensor, dout: torch.Tensor, delta: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """What each partial's kernel backward takes for the exact gradient of a merge whose rows have
    ``shift`` (from :func:`lse_shift`) and ``total = Σ w_i`` (``(...)``): ``(lse, dout, delta)`` with
    ``lse = shift`` (``+inf`` on rows with no keys, total 0, so that ``P = 0``), and ``dout (..., D)``
    and ``delta`` divided by ``total``."""
    inv = total.masked_fill(total == 0, 1.0).reciprocal()
    scaled_delta = None if delta is None else delta * inv
    return shift.masked_fill(total == 0, float("inf")), dout * inv.unsqueeze(-1).to(dout.dtype), scaled_delta


def merge_step(out_sum: torch.Tensor, lse_max: torch.Tensor, total: torch.Tensor, out_b: torch.Tensor,
               lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one partial ``(out_b (..., D), lse_b (...))`` into a running merge (an online softmax over
    partials): ``out_sum = Σ w_i O_i`` and ``total = Σ w_i`` with weights relative to the largest LSE so
    far, ``lse_max`` (start from zeros, zeros and ``-inf``). Returns the new ``(out_sum, lse_max, total)``,
    to be finished by :func:`finish_merge` with ``lse_shift(lse_max)``."""
    new_max = torch.maximum(lse_max, lse_b)  # propagates NaN
    shift = lse_shift(new_max)
    rescale, weight = torch.exp(lse_max - shift), torch.exp(lse_b - shift)
    return out_sum * rescale.unsqueeze(-1) + out_b * weight.unsqueeze(-1), new_max, total * rescale + weight
