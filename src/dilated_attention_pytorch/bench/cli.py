"""``python -m dilated_attention_pytorch bench``: dilated attention against the dense ceiling, side by side.

In one run it times, for every sequence length and mode (forward, forward+backward):
- ``dense``: PyTorch SDPA (cuDNN backend on CUDA) on the whole sequence, where it fits ``--dense-max``;
- ``ceiling``: dense SDPA (cuDNN) on the shapes each pattern reduces to — a batch of sequences of
  ``w_i / r_i`` tokens per pattern — summed over patterns: the speed an exact dilated kernel can hope for;
- ``portable`` and ``fused``: this library's backends.
It reports milliseconds, useful TF/s (attended pairs only), the ratio to the ceiling's TF/s, peak
memory and the minimum memory (q, k, v, out, lse and, with backward, their gradients); prints a
GitHub table and writes JSON, CSV and a PNG plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..functional import dilated_attention
from .flops import attended_pairs, dense_pairs, useful_flops
from .measure import measure

__all__ = ["BenchConfig", "git_commit", "main", "run"]

GPU_DEFAULT = dict(seq_lens=[65536, 262144, 1048576], heads=16, head_dim=128,
                   segments=[2048, 4096, 8192, 16384, 32768], dilations=[1, 2, 4, 8, 16], dtype="bfloat16")
CPU_DEFAULT = dict(seq_lens=[2048, 4096], heads=4, head_dim=32, segments=[256, 512, 1024], dilations=[1, 2, 4],
                   dtype="float32")


@dataclass(frozen=True)
class BenchConfig:
    seq_lens: list[int]
    heads: int
    head_dim: int
    segments: list[int]
    dilations: list[int]
    dtype: str
    batch: int = 1
    causal: bool = False
    kv_heads: Optional[int] = None
    methods: list[str] = field(default_factory=lambda: ["dense", "ceiling", "portable", "fused"])
    modes: list[str] = field(default_factory=lambda: ["fwd", "fwdbwd"])
    dense_max: int = 262144
    warmup: int = 1
    repeats: int = 3
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def _sdpa_context(device: torch.device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type == "cuda":
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])


def _randn(shape, cfg: BenchConfig, grad: bool) -> torch.Tensor:
    t = torch.randn(shape, device=cfg.device, dtype=getattr(torch, cfg.dtype))
    return t.requires_grad_(grad)


def _step(fn: Callable[[], torch.Tensor], grad_out: Optional[torch.Tensor], inputs) -> Callable[[], None]:
    def call() -> None:
        for t in inputs:  # fresh gradients each call: accumulating into old ones would inflate peak memory
            t.grad = None
        out = fn()
        if grad_out is not None:
            out.backward(grad_out)

    return call


def _time_sdpa(cfg: BenchConfig, batch: int, length: int, backward: bool) -> tuple[float, float]:
    device = torch.device(cfg.device)
    h, hk, d = cfg.heads, cfg.kv_heads or cfg.heads, cfg.head_dim
    q = _randn((batch, h, length, d), cfg, backward)
    k, v = (_randn((batch, hk, length, d), cfg, backward) for _ in range(2))
    g = torch.randn_like(q) if backward else None

    def fn():
        with _sdpa_context(device):
            return F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, enable_gqa=hk != h)

    return measure(_step(fn, g, (q, k, v)), device, cfg.warmup, cfg.repeats)


def _time_dilated(cfg: BenchConfig, n: int, backend: str, backward: bool) -> tuple[float, float]:
    device = torch.device(cfg.device)
    q = _randn((cfg.batch, n, cfg.heads, cfg.head_dim), cfg, backward)
    k, v = (_randn((cfg.batch, n, cfg.kv_heads or cfg.heads, cfg.head_dim), cfg, backward) for _ in range(2))
    g = torch.randn_like(q) if backward else None
    fn = lambda: dilated_attention(q, k, v, cfg.segments, cfg.dilations, is_causal=cfg.causal, backend=backend)  # noqa: E731
    return measure(_step(fn, g, (q, k, v)), device, cfg.warmup, cfg.repeats)


def _ceiling(cfg: BenchConfig, n: int, backward: bool) -> tuple[float, float]:
    """Dense SDPA on the shape each pattern reduces to, summed over patterns."""
    total_ms, peak = 0.0, 0.0
    for w, r in zip(cfg.segments, cfg.dilations):
        seg = min(w, n)
        ms, p = _time_sdpa(cfg, cfg.batch * math.ceil(n / seg), math.ceil(seg / r), backward)
        total_ms, peak = total_ms + ms, max(peak, p)
    return total_ms, peak


def _min_bytes(cfg: BenchConfig, n: int, backward: bool) -> float:
    elem = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    q = cfg.batch * n * cfg.heads * cfg.head_dim * elem
    kv = 2 * cfg.batch * n * (cfg.kv_heads or cfg.heads) * cfg.head_dim * elem
    lse = cfg.batch * n * cfg.heads * 4
    return (2 * (q + kv + q) if backward else q + kv + q) + lse


def _row(cfg, method, n, mode, ms, peak, pairs, status) -> dict:
    backward = mode == "fwdbwd"
    tflops = useful_flops(pairs, cfg.head_dim, cfg.batch, backward) / (ms * 1e-3) / 1e12 if ms else None
    return dict(method=method, seq_len=n, mode=mode, ms=ms, tflops=tflops, peak_gb=peak / 2**30 if peak else None,
                min_gb=_min_bytes(cfg, n, backward) / 2**30, status=status)


def run(cfg: BenchConfig) -> list[dict]:
    from tqdm import tqdm

    rows = []
    jobs = [(n, mode, method) for n in cfg.seq_lens for mode in cfg.modes for method in cfg.methods]
    for n, mode, method in tqdm(jobs, desc="bench", unit="run"):
        backward = mode == "fwdbwd"
        pairs = attended_pairs(n, cfg.heads, cfg.segments, cfg.dilations, is_causal=cfg.causal)
        if method == "dense":
            pairs = dense_pairs(n, cfg.heads, cfg.causal)
        if method == "dense" and n > cfg.dense_max:
            rows.append(_row(cfg, method, n, mode, None, 0, pairs, f"skipped: n > --dense-max {cfg.dense_max}"))
            continue
        if method == "fused" and cfg.device != "cuda":
            rows.append(_row(cfg, method, n, mode, None, 0, pairs, "skipped: the fused backend needs CUDA"))
            continue
        try:
            if method == "dense":
                ms, peak = _time_sdpa(cfg, cfg.batch, n, backward)
            elif method == "ceiling":
                ms, peak = _ceiling(cfg, n, backward)
            else:
                ms, peak = _time_dilated(cfg, n, method, backward)
            status = "ok"
        except torch.cuda.OutOfMemoryError:
            ms, peak, status = None, 0, "out of memory"
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
        rows.append(_row(cfg, method, n, mode, ms, peak, pairs, status))
    ceilings = {(r["seq_len"], r["mode"]): r["tflops"] for r in rows if r["method"] == "ceiling" and r["tflops"]}
    for r in rows:
        c = ceilings.get((r["seq_len"], r["mode"]))
        r["vs_ceiling"] = r["tflops"] / c if c and r["tflops"] else None
    return rows


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    lines = ["| n | mode | method | ms | TF/s | × ceiling | peak GB | min GB | status |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['seq_len']} | {r['mode']} | {r['method']} | {_fmt(r['ms'], '.2f')} | {_fmt(r['tflops'], '.3g')} "
            f"| {_fmt(r['vs_ceiling'], '.2f')} | {_fmt(r['peak_gb'], '.2f')} | {_fmt(r['min_gb'], '.2f')} | {r['status']} |"
        )
    return "\n".join(lines)


def git_commit() -> str:
    """$GIT_COMMIT, else the short hash of HEAD, else ``unknown``."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return "unknown"
    return res.stdout.strip() or "unknown"


def write_outputs(cfg: BenchConfig, rows: list[dict], out_dir: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu"
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=device,
                torch=torch.__version__, commit=git_commit(), config=dataclasses.asdict(cfg))
    (out_dir / f"{name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    with open(out_dir / f"{name}.csv", "w") as f:
        f.write(",".join(rows[0]) + "\n")
        for r in rows:
            f.write(",".join("" if v is None else str(v) for v in r.values()) + "\n")
    fig, axes = plt.subplots(1, len(cfg.modes), figsize=(6 * len(cfg.modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], cfg.modes):
        for method in cfg.methods:
            pts = [(r["seq_len"], r["tflops"]) for r in rows if r["mode"] == mode and r["method"] == method and r["tflops"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("useful TF/s")
        ax.set_title(f"{mode} — {device}, {cfg.dtype}")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=120)


def main(argv: Optional[list[str]] = None) -> None:
    on_gpu = torch.cuda.is_available()
    base = GPU_DEFAULT if on_gpu else CPU_DEFAULT
    p = argparse.ArgumentParser(prog="python -m dilated_attention_pytorch bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=base["seq_lens"])
    p.add_argument("--heads", type=int, default=base["heads"])
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=base["head_dim"])
    p.add_argument("--segments", type=int, nargs="+", default=base["segments"])
    p.add_argument("--dilations", type=int, nargs="+", default=base["dilations"])
    p.add_argument("--dtype", default=base["dtype"], choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--methods", nargs="+", default=["dense", "ceiling", "portable", "fused"],
                   choices=["dense", "ceiling", "portable", "fused"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--dense-max", type=int, default=262144, help="longest sequence for whole-sequence dense SDPA")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default=None, help="file name stem for JSON/CSV/PNG (default: bench-<device>-<date>)")
    a = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench needs tqdm and matplotlib: pip install 'dilated-attention-pytorch[bench]' ({e})")
    cfg = BenchConfig(seq_lens=a.seq_lens, heads=a.heads, head_dim=a.head_dim, segments=a.segments,
                      dilations=a.dilations, dtype=a.dtype, batch=a.batch, causal=a.causal, kv_heads=a.kv_heads,
                      methods=a.methods, modes=a.modes, dense_max=a.dense_max, warmup=a.warmup, repeats=a.repeats)
    rows = run(cfg)
    print(table(rows))
    name = a.name or f"bench-{'gpu' if on_gpu else 'cpu'}-{datetime.date.today().isoformat()}"
    write_outputs(cfg, rows, a.out, name)
    print(f"wrote {a.out / name}.json, .csv, .png")
