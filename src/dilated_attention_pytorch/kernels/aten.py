"""PyTorch's own fused attention kernels that return the log-sum-exp (aten ops)."""

from __future__ import annotations

from typing import Any

import torch

from ..capabilities import Declared, Support
from .math import MathKernel

_ONE_ROW = MathKernel()

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

    def forward(self, q, k, v, *, key_valid, is_causal, scale, dropout_p):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=_additive_mask(key_valid, q.dtype), scale=scale
        )
        return out, lse, None

    def backward(self, dout, q, k, v, out, lse, rng_state, *, key_valid, is_causal, scale, dropout_p, delta):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32),
            0.0, is_causal, attn_mask=_additive_mask(key_valid, q.dtype), scale=scale,
        )


class CudaFlashKernel(Declared):
    """``aten::_scaled_dot_product_flash_attention`` (FlashAttention-2): fp16/bf16, dropout; no masks."""

    name = "cuda_flash"
    support = Support(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), max_head_dim=256, head_dim_multiple=8,
                      key_mask=False, lse_grad=False)

    def forward(self, q, k, v, *, key_valid, is_causal, scale, dropout_p):
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, is_causal, False, scale=scale
        )
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset = res[:8]
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, rng_state, *, key_valid, is_causal, scale, dropout_p, delta):
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

    def forward(self, q, k, v, *, key_valid, is_causal, scale, dropout_p):
        if q.shape[2] == 1:  # cuDNN rejects s_q = s_kv = 1; such blocks are one dot product each
            return _ONE_ROW.forward(q, k, v, key_valid=None, is_causal=is_causal, scale=scale, dropout_p=0.0)
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, is_causal, False, scale=scale)
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset = res[:8]
        return out, _cudnn_lse(lse, q), (lse.dim(), cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, rng_state, *, key_valid, is_causal, scale, dropout_p, delta):
        if q.shape[2] == 1:
            return _ONE_ROW.backward(dout, q, k, v, out, lse, rng_state, key_valid=None, is_causal=is_causal,
                                     scale=scale, dropout_p=0.0, delta=None)
        lse_dim, cum_q, cum_k, max_q, max_k, seed, offset = rng_state
        stats = lse.float().reshape(*lse.shape, *([1] * (lse_dim - 3))).contiguous()
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, stats, seed, offset, None, cum_q, cum_k,
            max_q, max_k, 0.0, is_causal, scale=scale,
        )
        return dq, dk, dv
