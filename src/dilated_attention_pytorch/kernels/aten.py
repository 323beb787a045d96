"""PyTorch's own fused attention kernels that return the log-sum-exp (aten ops)."""

from __future__ import annotations

from typing import Any

import torch

from ..capabilities import Declared, Support
from .base import has_key, inert_padding
from .math import MathKernel

_MATH = MathKernel()  # blocks of one row for cuDNN; NaN rows of the CPU kernel

__all__ = ["CpuFlashKernel", "CudaFlashKernel", "CudnnKernel"]


def _additive_mask(key_valid, dtype) -> Any:
    """(B, L) bool -> (B, 1, 1, L) additive mask (0 or -inf) in the query dtype, or None."""
    if key_valid is None:
        return None
    mask = torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device)
    return mask.masked_fill_(~key_valid, float("-inf"))[:, None, None, :]


class CpuFlashKernel(Declared):
    """``aten::_scaled_dot_product_flash_attention_for_cpu``: any float dtype, key masks; no dropout."""

    name = "cpu_flash"
    support = Support(devices=("cpu",), dropout=False, lse_grad=False)

    def forward(self, q, k, v, *, key_valid, is_causal, scale, dropout_p, padding_finite=False):
        q, k, v = inert_padding(q, k, v, key_valid, is_causal, padding_finite)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=_additive_mask(key_valid, q.dtype), scale=scale
        )
        return (*_with_nan_rows(out, lse, q, k, v, key_valid, is_causal, scale), None)

    def backward(self, dout, q, k, v, out, lse, rng_state, *, key_valid, is_causal, scale, dropout_p, delta,
                 padding_finite=False):
        q, k, v = inert_padding(q, k, v, key_valid, is_causal, padding_finite)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32),
            0.0, is_causal, attn_mask=_additive_mask(key_valid, q.dtype), scale=scale,
        )


def _with_nan_rows(out, lse, q, k, v, key_valid, is_causal, scale):
    """The CPU kernel's rows whose scores are all NaN, made NaN (out and LSE) as they should be.

    The kernel takes a row's maximum score with a NaN-dropping ``max`` on the last ``L mod width``
    keys (its scalar tail; ``width`` is the SIMD width, so blocks of fewer keys than that are all
    tail), so a row whose scores are all NaN (a NaN query; its only keys NaN) looks like a row with no
    keys and comes back as zeros with LSE 0. Such rows are found by that output (rare otherwise:
    it needs a row with LSE exactly 0 and an output of exact zeros, e.g. one key with score 0 and
    value 0) and recomputed by the math kernel, which gets them right either way. On the CPU the
    check's host sync stalls no device queue; under ``torch.compile`` (no host sync in a graph) the
    rows are found from the inputs instead."""
    if torch.compiler.is_compiling():
        return _nan_rows_from_inputs(out, lse, q, k, key_valid, is_causal)
    suspect = lse == 0
    if key_valid is not None:  # rows with no keys are zeros with LSE 0 too, rightly
        suspect = suspect & has_key(key_valid, is_causal)[:, None, :]
    if not bool(suspect.any()):
        return out, lse
    suspect = suspect & (out == 0).all(-1)
    if not bool(suspect.any()):
        return out, lse
    out_m, lse_m, _ = _MATH.forward(q, k, v, key_valid=key_valid, is_causal=is_causal, scale=scale, dropout_p=0.0)
    return torch.where(suspect[..., None], out_m, out), torch.where(suspect, lse_m.to(lse.dtype), lse)


def _nan_rows_from_inputs(out, lse, q, k, key_valid, is_causal):
    """:func:`_with_nan_rows` without a host sync (torch.compile fuses these ops): the rows with a NaN
    query or NaN in every key they see."""
    finite_key = ~k.isnan().any(-1)  # (B, H, L)
    if key_valid is not None:
        finite_key = finite_key & key_valid[:, None, :]
    sees_finite = finite_key.cumsum(-1) > 0 if is_causal else finite_key.any(-1, keepdim=True)
    nan_row = q.isnan().any(-1) | ~sees_finite
    if key_valid is not None:  # rows with no keys stay zeros with LSE "no keys"
        nan_row = nan_row & has_key(key_valid, is_causal)[:, None, :]
    return out.masked_fill(nan_row[..., None], float("nan")), lse.masked_fill(nan_row, float("nan"))


class CudaFlashKernel(Declared):
    """``aten::_scaled_dot_product_flash_attention`` (FlashAttention-2): fp16/bf16, dropout; no masks."""

    name = "cuda_flash"
    support = Support(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), max_head_dim=256, head_dim_multiple=8,
                      key_mask=False, lse_grad=False)

    def forward(self, q, k, v, *, key_valid, is_causal, scale, dropout_p, padding_finite=False):
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, is_causal, False, scale=scale
        )
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset = res[:8]
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, rng_state, *, key_valid, is_causal, scale, dropout_p, delta,
                 padding_finite=False):
        cum_q, cum_k, max_q, max_k, seed, offset = rng_state
        # FlashAttention-2's backward gave wrong gradients on some strided layouts (seen on an H200 with
        # key/value copies beside strided queries); contiguous inputs are always right.
        dout, q, k, v, out = (x.contiguous() for x in (dout, q, k, v, out))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.float().contiguous(), cum_q, cum_k, max_q, max_k, dropout_p, is_causal,
            seed, offset, scale=scale,
        )
        return dq, dk, dv


def _cudnn_lse(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """cuDNN's softmax statistics as (B, H, L) float32, whatever trailing unit dims it adds."""
    b, h, length, _ = q.shape
    return lse.reshape(b, h, length) if lse.dim() != 3 else lse


class CudnnKernel(Declared):
    """``aten::_scaled_dot_product_cudnn_attention`` (cuDNN flash attention, FA3 class on Hopper).

    fp16/bf16, head_dim a multiple of 8 up to 128; no masks, no dropout.
    """

    name = "cudnn"
    support = Support(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), max_head_dim=128, head_dim_multiple=8,
                      key_mask=False, dropout=False, lse_grad=False)

    def forward(self, q, k, v, *, key_valid, is_causal, scale, dropout_p, padding_finite=False):
        if q.shape[2] == 1:  # cuDNN rejects s_q = s_kv = 1; such blocks are one dot product each
            return _MATH.forward(q, k, v, key_valid=None, is_causal=is_causal, scale=scale, dropout_p=0.0)
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, is_causal, False, scale=scale)
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset = res[:8]
        return out, _cudnn_lse(lse, q), (lse.dim(), cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, rng_state, *, key_valid, is_causal, scale, dropout_p, delta,
                 padding_finite=False):
        if q.shape[2] == 1:
            return _MATH.backward(dout, q, k, v, out, lse, rng_state, key_valid=None, is_causal=is_causal,
                                  scale=scale, dropout_p=0.0, delta=None)
        lse_dim, cum_q, cum_k, max_q, max_k, seed, offset = rng_state
        stats = lse.float().reshape(*lse.shape, *([1] * (lse_dim - 3))).contiguous()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, stats, seed, offset, None, cum_q, cum_k,
            max_q, max_k, 0.0, is_causal, scale=scale,
        )
        return dq, dk, dv
