"""Gathering rows by an index and adding them back, in Triton: the copies around a packed call
(:mod:`..packing`). ``index_select`` and ``index_add_`` do the same at a third of the bandwidth on an
H200 (256-byte rows; ``index_add_`` with atomics). Runs in Triton's interpreter on the CPU (the tests)."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["add_rows", "gather_rows"]

BLOCK_R = 32


def _launch(dst: torch.Tensor, src: torch.Tensor, index: torch.Tensor, start: int, stop: int, add: bool) -> None:
    from ._rows_kernel import rows_kernel  # imports triton

    d = dst.shape[-1]
    if dst.stride(-1) != 1 or src.stride(-1) != 1 or src.shape[-1] != d:
        raise ValueError(f"rows must be contiguous and of one width, got {tuple(dst.shape)} / {dst.stride()} and "
                         f"{tuple(src.shape)} / {src.stride()}")
    if stop > start:
        rows_kernel[(-(-(stop - start) // BLOCK_R),)](
            dst, src, index, start, stop, d, dst.stride(0), src.stride(0), ADD=add, BLOCK_R=BLOCK_R,
            BLOCK_D=max(16, 1 << (d - 1).bit_length()), num_warps=4)


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``src (R, D)`` rows ``index (T,)`` -> ``(T, D)``: ``src.index_select(0, index)``."""
    out = torch.empty((index.numel(), src.shape[-1]), dtype=src.dtype, device=src.device)
    _launch(out, src, index, 0, index.numel(), add=False)
    return out


def add_rows(dst: torch.Tensor, src: torch.Tensor, index: torch.Tensor, runs: Sequence[tuple[int, int]]) -> None:
    """``dst.index_add_(0, index, src)`` for ``dst (R, D)``, ``src (T, D)``, one launch per ``(start, stop)`` of
    ``runs`` (covering ``[0, T)``), whose indices must be distinct within each run."""
    for start, stop in runs:
        _launch(dst, src, index, start, stop, add=True)
