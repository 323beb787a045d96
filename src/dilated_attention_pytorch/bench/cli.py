"""``python -m dilated_attention_pytorch bench``: dilated attention against the dense ceiling, side by side.

In one run it times, for every sequence length and mode (forward, forward+backward):
- ``dense``: PyTorch SDPA (cuDNN backend on CUDA) on the whole sequence, where it fits ``--dense-max``;
- ``ceiling``: dense SDPA (cuDNN) on the shapes each pattern reduces to — a batch of sequences of
  ``w_i / r_i`` tokens per pattern — summed over patterns: the speed an exact dilated kernel can hope for;
- ``portable`` and ``fused``: this library's backends.
It prints the configuration, then a GitHub table (milliseconds with their spread, useful TF/s over
attended pairs only, the ratio to the ceiling's TF/s, the speed-up over dense, peak and minimum
memory) with a line on every column, and writes JSON, CSV and two PNG plots (useful TF/s against
sequence length; time against sequence length, log-log, dense extrapolated where it does not fit)
under --out, never over an earlier run's files.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import _cli
from ..capabilities import has_package
from ..functional import dilated_attention
from .flops import attended_pairs, dense_pairs, useful_flops
from .measure import Timing, time_calls

__all__ = ["BenchConfig", "build_parser", "git_commit", "main", "run"]

GPU_DEFAULT = dict(seq_lens=[65536, 262144, 1048576], heads=16, head_dim=128,
                   segments=[2048, 4096, 8192, 16384, 32768], dilations=[1, 2, 4, 8, 16], dtype="bfloat16")
CPU_DEFAULT = dict(seq_lens=[1024, 2048, 4096], heads=4, head_dim=32, segments=[256, 512, 1024], dilations=[1, 2, 4],
                   dtype="float32", dense_max=2048)
GPU_DEFAULT["dense_max"] = 262144
METHODS = ("dense", "ceiling", "portable", "fused")
# each timing: at least `warmup` calls and MIN_WARMUP_S seconds of warm-up, then `repeats` calls and MIN_TIME_S
MIN_WARMUP_S, MIN_TIME_S = 0.25, 0.5


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
    warmup: int = 3
    repeats: int = 10
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


def _time(cfg: BenchConfig, call: Callable[[], None]) -> Timing:
    return time_calls(call, torch.device(cfg.device), cfg.warmup, cfg.repeats, min_warmup_s=MIN_WARMUP_S,
                      min_time_s=MIN_TIME_S)


def _time_sdpa(cfg: BenchConfig, batch: int, length: int, backward: bool) -> Timing:
    device = torch.device(cfg.device)
    h, hk, d = cfg.heads, cfg.kv_heads or cfg.heads, cfg.head_dim
    q = _randn((batch, h, length, d), cfg, backward)
    k, v = (_randn((batch, hk, length, d), cfg, backward) for _ in range(2))
    g = torch.randn_like(q) if backward else None

    def fn():
        with _sdpa_context(device):
            return F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, enable_gqa=hk != h)

    return _time(cfg, _step(fn, g, (q, k, v)))


def _time_dilated(cfg: BenchConfig, n: int, backend: str, backward: bool) -> Timing:
    q = _randn((cfg.batch, n, cfg.heads, cfg.head_dim), cfg, backward)
    k, v = (_randn((cfg.batch, n, cfg.kv_heads or cfg.heads, cfg.head_dim), cfg, backward) for _ in range(2))
    g = torch.randn_like(q) if backward else None
    fn = lambda: dilated_attention(q, k, v, cfg.segments, cfg.dilations, is_causal=cfg.causal, backend=backend)  # noqa: E731
    return _time(cfg, _step(fn, g, (q, k, v)))


def _ceiling_timing(cfg: BenchConfig, n: int, backward: bool) -> Timing:
    """Dense SDPA on the shape each pattern reduces to, summed over patterns (quartiles summed too)."""
    parts = [_time_sdpa(cfg, cfg.batch * math.ceil(n / min(w, n)), math.ceil(min(w, n) / r), backward)
             for w, r in zip(cfg.segments, cfg.dilations)]
    return Timing(sum(t.ms for t in parts), sum(t.p25 for t in parts), sum(t.p75 for t in parts),
                  min(t.calls for t in parts), max(t.peak for t in parts))


def _ceiling(cfg: BenchConfig, n: int, backward: bool) -> tuple[float, float]:
    """-> (milliseconds, peak bytes) of the ceiling."""
    t = _ceiling_timing(cfg, n, backward)
    return t.ms, t.peak


def _min_bytes(cfg: BenchConfig, n: int, backward: bool) -> float:
    elem = torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    q = cfg.batch * n * cfg.heads * cfg.head_dim * elem
    kv = 2 * cfg.batch * n * (cfg.kv_heads or cfg.heads) * cfg.head_dim * elem
    lse = cfg.batch * n * cfg.heads * 4
    return (2 * (q + kv + q) if backward else q + kv + q) + lse


def _row(cfg, method, n, mode, t: Optional[Timing], pairs, status) -> dict:
    backward, ms = mode == "fwdbwd", t.ms if t else None
    tflops = useful_flops(pairs, cfg.head_dim, cfg.batch, backward) / (ms * 1e-3) / 1e12 if ms else None
    return dict(method=method, seq_len=n, mode=mode, ms=ms, spread_pct=100 * (t.p75 - t.p25) / t.ms if t else None,
                calls=t.calls if t else None, tflops=tflops, peak_gb=t.peak / 2**30 if t and t.peak else None,
                min_gb=_min_bytes(cfg, n, backward) / 2**30, status=status)


def _one(cfg: BenchConfig, method: str, n: int, backward: bool) -> tuple[Optional[Timing], str]:
    if method == "dense" and n > cfg.dense_max:
        return None, f"skipped: n > --dense-max {cfg.dense_max}"
    if method == "fused" and cfg.device != "cuda":
        return None, "skipped: the fused backend needs CUDA"
    try:
        if method == "dense":
            return _time_sdpa(cfg, cfg.batch, n, backward), "ok"
        if method == "ceiling":
            return _ceiling_timing(cfg, n, backward), "ok"
        return _time_dilated(cfg, n, method, backward), "ok"
    except torch.cuda.OutOfMemoryError:
        return None, "out of memory"
    finally:
        if cfg.device == "cuda":
            torch.cuda.empty_cache()


def run(cfg: BenchConfig, progress: bool = True) -> list[dict]:
    """Every (sequence length, mode, method): one row. Adds the ratios to the ceiling's TF/s and to dense's
    time, and ``dense_estimate_ms``: dense's time where it was not measured, extrapolated ∝ n² from the
    longest length it was measured at."""
    from tqdm import tqdm

    rows = []
    jobs = [(n, mode, method) for n in cfg.seq_lens for mode in cfg.modes for method in cfg.methods]
    for n, mode, method in tqdm(jobs, desc="bench", unit="run", disable=not progress):
        pairs = dense_pairs(n, cfg.heads, cfg.causal) if method == "dense" else \
            attended_pairs(n, cfg.heads, cfg.segments, cfg.dilations, is_causal=cfg.causal)
        timing, status = _one(cfg, method, n, mode == "fwdbwd")
        rows.append(_row(cfg, method, n, mode, timing, pairs, status))
    for mode in cfg.modes:
        dense = {r["seq_len"]: r["ms"] for r in rows if r["method"] == "dense" and r["mode"] == mode and r["ms"]}
        ceilings = {r["seq_len"]: r["tflops"] for r in rows if r["method"] == "ceiling" and r["mode"] == mode}
        for r in (r for r in rows if r["mode"] == mode):
            c, d = ceilings.get(r["seq_len"]), dense.get(r["seq_len"])
            r["vs_ceiling"] = r["tflops"] / c if c and r["tflops"] and r["method"] != "dense" else None
            r["vs_dense"] = d / r["ms"] if d and r["ms"] and r["method"] != "dense" else None
            r["dense_estimate_ms"] = None
            if r["method"] == "dense" and not r["ms"] and dense:
                n0 = max(m for m in dense if m < r["seq_len"]) if any(m < r["seq_len"] for m in dense) else None
                if n0 is not None:
                    r["dense_estimate_ms"] = dense[n0] * (r["seq_len"] / n0) ** 2
    return rows


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


COLUMNS = (  # (header, row key, format, what it means)
    ("n", "seq_len", "d", "sequence length (tokens)"),
    ("mode", "mode", "s", "fwd = forward; fwdbwd = forward + backward"),
    ("method", "method", "s", "dense = SDPA on the whole sequence (all n² query-key pairs); ceiling = dense SDPA on "
     "the shapes the patterns reduce to (the same pairs as dilated attention: the speed an exact dilated kernel can "
     "hope for); portable, fused = this library's backends"),
    ("ms", "ms", ".2f", "median time of one call, milliseconds"),
    ("± %", "spread_pct", ".0f", "spread: interquartile range of the timed calls, % of the median"),
    ("TF/s", "tflops", ".3g", "useful tera-FLOP/s: 4·head_dim FLOPs per attended query-key pair (×3.5 with backward) "
     "over the time; dense counts its n² pairs"),
    ("× ceiling", "vs_ceiling", ".2f", "TF/s ÷ the ceiling's TF/s at this n and mode (1 = as fast as dense attention "
     "on the same pairs); blank for dense, which does other work"),
    ("× dense", "vs_dense", ".1f", "speed-up: dense's ms ÷ this row's ms (whole-sequence attention vs this method)"),
    ("peak GB", "peak_gb", ".2f", "peak GPU memory allocated in one call (not measured on CPU)"),
    ("min GB", "min_gb", ".3f", "the least memory the call needs: q, k, v, output, LSE (and their gradients)"),
    ("status", "status", "s", "ok, or why the row has no time"),
)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|" + "|".join("---" if c[2] == "s" else "---:" for c in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[key], spec) for _, key, spec, _ in COLUMNS) + " |")
    return "\n".join(lines)


def legend() -> str:
    width = max(len(c[0]) for c in COLUMNS)
    return "columns:\n" + "\n".join(f"  {c[0]:<{width}}  {c[3]}" for c in COLUMNS)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "")
    return f"cpu ({model or platform.machine()}, {torch.get_num_threads()} threads)"


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return fh.read().splitlines()
    except OSError:
        return []


def header(cfg: BenchConfig) -> str:
    dense = f"dense (n <= {cfg.dense_max})" if "dense" in cfg.methods else ""
    methods = ", ".join(dense if m == "dense" else m for m in cfg.methods)
    patterns = ", ".join(f"{w}/{r}" for w, r in zip(cfg.segments, cfg.dilations))
    return "\n".join([
        f"bench: dilated attention vs dense attention on {device_name(cfg.device)}, torch {torch.__version__}",
        f"  batch {cfg.batch}, heads {cfg.heads} (key/value heads {cfg.kv_heads or cfg.heads}), head_dim "
        f"{cfg.head_dim}, {cfg.dtype}, causal {cfg.causal}",
        f"  patterns (segment w / dilation r): {patterns}",
        f"  sequence lengths {', '.join(map(str, cfg.seq_lens))}; modes {', '.join(cfg.modes)}; methods {methods}",
        f"  timing: >= {cfg.warmup} warm-up calls and {MIN_WARMUP_S} s, then >= {cfg.repeats} timed calls and "
        f"{MIN_TIME_S} s per measurement; the median is reported",
    ])


def git_commit() -> str:
    """$GIT_COMMIT, else the short hash of HEAD, else ``unknown``."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return "unknown"
    return res.stdout.strip() or "unknown"


SUFFIXES = (".json", ".csv", ".png", "-time.png")


def unused_stem(out_dir: Path, name: str) -> Path:
    """``out_dir/name``, or ``name-2``, ``name-3``, ...: the first stem none of whose files exist."""
    stem, i = out_dir / name, 1
    while any(Path(f"{stem}{s}").exists() for s in SUFFIXES):
        i += 1
        stem = out_dir / f"{name}-{i}"
    return stem


def write_outputs(cfg: BenchConfig, rows: list[dict], out_dir: Path, name: str) -> list[Path]:
    """JSON, CSV, the TF/s plot and the time plot, under a stem no earlier file has; -> their paths."""
    from .plots import time_plot, tflops_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = unused_stem(out_dir.resolve(), name)
    paths = [Path(f"{stem}{s}") for s in SUFFIXES]
    device = device_name(cfg.device)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=device,
                torch=torch.__version__, commit=git_commit(), config=dataclasses.asdict(cfg),
                columns={c[1]: c[3] for c in COLUMNS})
    paths[0].write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    with open(paths[1], "w") as f:
        f.write(",".join(rows[0]) + "\n")
        for r in rows:
            f.write(",".join("" if v is None else str(v) for v in r.values()) + "\n")
    title = f"{device}, {cfg.dtype}, h={cfg.heads}, d={cfg.head_dim}"
    tflops_plot(rows, cfg.modes, cfg.methods, title, paths[2])
    time_plot(rows, cfg.modes, cfg.methods, title, paths[3])
    return paths


def build_parser() -> argparse.ArgumentParser:
    on_gpu = torch.cuda.is_available()
    base = GPU_DEFAULT if on_gpu else CPU_DEFAULT
    pos = _cli.positive_int
    p = _cli.parser("bench", __doc__)
    p.add_argument("--seq-lens", type=pos, nargs="+", default=base["seq_lens"], help="sequence lengths to time")
    p.add_argument("--heads", type=pos, default=base["heads"], help="query heads")
    p.add_argument("--kv-heads", type=pos, default=None, help="key/value heads (grouped-query; default: --heads)")
    p.add_argument("--head-dim", type=pos, default=base["head_dim"], help="dimension of each head")
    p.add_argument("--segments", type=pos, nargs="+", default=base["segments"], help="segment length w of each pattern")
    p.add_argument("--dilations", type=pos, nargs="+", default=base["dilations"],
                   help="dilation rate r of each pattern")
    p.add_argument("--dtype", default=base["dtype"], choices=_cli.DTYPES, help="dtype of q, k, v")
    p.add_argument("--batch", type=pos, default=1, help="batch size")
    p.add_argument("--causal", action="store_true", help="causal masking")
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if on_gpu or m != "fused"], choices=METHODS,
                   help="what to time (fused needs CUDA)")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"],
                   help="forward, forward + backward")
    p.add_argument("--dense-max", type=pos, default=base["dense_max"],
                   help="longest sequence for whole-sequence dense SDPA (longer: extrapolated ∝ n² in the plot)")
    p.add_argument("--warmup", type=pos, default=3, help=f"warm-up calls per measurement (and >= {MIN_WARMUP_S} s)")
    p.add_argument("--repeats", type=pos, default=10, help=f"timed calls per measurement (and >= {MIN_TIME_S} s)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="folder for the output files (relative to the current folder)")
    p.add_argument("--name", default=None, help="file name stem for JSON/CSV/PNG (default: bench-<cpu|gpu>-<date>-"
                   "<time>); a taken stem gets -2, -3, ...: nothing is overwritten")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: Optional[list[str]] = None) -> list[Path]:
    return _bench(build_parser().parse_args(argv))


def _bench(a) -> list[Path]:
    from .._validation import check_patterns

    for pkg in ("matplotlib", "tqdm"):
        if not has_package(pkg):
            raise _cli.UsageError(f"bench needs tqdm and matplotlib: pip install 'dilated-attention-pytorch[bench]' "
                                  f"({pkg} is missing)")
    _cli.check(check_patterns, a.segments, a.dilations)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and set(a.methods) <= {"fused"}:
        raise _cli.UsageError("--methods fused needs a CUDA GPU; on CPU choose among dense, ceiling, portable")
    if a.kv_heads is not None and a.heads % a.kv_heads:
        raise _cli.UsageError(f"--heads ({a.heads}) must be a multiple of --kv-heads ({a.kv_heads})")
    cfg = BenchConfig(seq_lens=a.seq_lens, heads=a.heads, head_dim=a.head_dim, segments=a.segments,
                      dilations=a.dilations, dtype=a.dtype, batch=a.batch, causal=a.causal, kv_heads=a.kv_heads,
                      methods=a.methods, modes=a.modes, dense_max=a.dense_max, warmup=a.warmup, repeats=a.repeats)
    print(header(cfg), flush=True)
    rows = run(cfg, progress=a.progress)
    print(table(rows))
    print(legend())
    name = a.name or f"bench-{'gpu' if on_gpu else 'cpu'}-{datetime.datetime.now():%Y-%m-%d-%H%M%S}"
    paths = write_outputs(cfg, rows, a.out, name)
    print("wrote\n" + "\n".join(f"  {path}" for path in paths))
    return paths
