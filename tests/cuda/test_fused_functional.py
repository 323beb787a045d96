"""The fused backend on CUDA in low precision: within twice the error of plain PyTorch in the same dtype,
forward and gradients, on awkward shapes (GPU only)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.reference_checks import AWKWARD, check_low_precision
from tests.helpers.tensors import LOW_PRECISION, rand_qkv

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("is_causal", [False, True])
def test_fused_low_precision_error_within_twice_plain_pytorch(dtype, is_causal):
    q, k, v = rand_qkv(2, 300, 8, 4, 64, device="cuda", dtype=dtype)
    check_low_precision(q, k, v, [64, 128, 256], [1, 2, 4], is_causal, "fused")


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", [c for c in AWKWARD if c[5] == "paper" and not c[6]])  # the fused path's settings
def test_fused_awkward_shapes_bf16(case, is_causal):
    n, h, h_kv, ws, rs, offsets, hg = case
    q, k, v = rand_qkv(2, n, h, h_kv, 64, device="cuda", dtype=torch.bfloat16)
    check_low_precision(q, k, v, ws, rs, is_causal, "fused")
