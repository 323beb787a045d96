"""The block-sparse benchmark problem shared by the GPU scripts, its dense cuDNN ceiling, and GPU time by
kernel from the profiler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["BlockSparseProblem", "block_sparse_problem", "dense_cudnn_fwd_bwd", "kernel_times"]


@dataclass
class BlockSparseProblem:
    n: int
    block_size: int
    layout: torch.Tensor  # (h, n / block_size, n / block_size) bool
    density: float
    q: torch.Tensor  # (b, n, h, d), requires grad
    k: torch.Tensor
    v: torch.Tensor
    grad: torch.Tensor  # incoming gradient of the output


def block_sparse_problem(n: int, *, batch: int = 1, heads: int = 16, head_dim: int = 128, block_size: int = 128,
                         density: float = 0.1, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                         device: str = "cuda") -> BlockSparseProblem:
    """A random per-head layout of ``density`` (the diagonal included) and random inputs."""
    from ..block_sparse import layout_density, random_layout

    nb = n // block_size
    layout = random_layout(nb, max(0.0, density - 1.0 / nb), num_heads=heads, seed=seed, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads, head_dim, device=device, dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    grad = torch.randn(q.shape, device=device, dtype=dtype, generator=gen)
    return BlockSparseProblem(n, block_size, layout, layout_density(layout), q, k, v, grad)


def dense_cudnn_fwd_bwd(p: BlockSparseProblem) -> Callable[[], None]:
    """Dense attention forward+backward on the same inputs with cuDNN's SDPA kernels (the ceiling)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (p.q, p.k, p.v))
    gt = p.grad.transpose(1, 2)

    def dense() -> None:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
        out.backward(gt)

    return dense


def kernel_times(fn: Callable[[], None]) -> dict:
    """One call under torch.profiler: GPU milliseconds by kernel name, the window from the first kernel's
    start to the last one's end, the GPU's idle time inside it, and the host's busiest operators."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times: dict = {}
    spans = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[ev.name[:80]] = times.get(ev.name[:80], 0.0) + ev.device_time / 1e3
            spans.append((ev.time_range.start, ev.time_range.end))
    if not spans:
        raise RuntimeError("kernel_times: the call ran no GPU kernel")
    spans.sort()
    idle, reach = 0.0, spans[0][1]
    for s, e in spans[1:]:
        idle += max(0.0, s - reach)
        reach = max(reach, e)
    host = sorted(prof.key_averages(), key=lambda e: -e.cpu_time_total)[:8]
    return dict(by_kernel=dict(sorted(times.items(), key=lambda kv: -kv[1])),
                window_ms=(reach - spans[0][0]) / 1e3, idle_ms=idle / 1e3,
                host_ops_ms={e.key[:60]: e.cpu_time_total / 1e3 for e in host})
