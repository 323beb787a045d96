"""Does LongNet use long context? The byte-level LongNetLM of ``train``, trained side by side with three
attention kinds: dense causal SDPA, local attention (one pattern, w = 2048, r = 1) and the LongNet schedule
(w = 2048, 4096, ... context; r = 1, 2, 4, ...; w / r = 2048).

Every kind gets the same model size, initial weights (same seed), data order, optimiser and wall-clock
budget (``--seconds`` of training per kind, evaluation not counted; ``--steps`` caps the steps). The
learning rate warms up over ``--warmup`` steps, then follows a cosine over the budget (the larger of the
step and time fractions), so every kind ends its schedule at its own last step. Reported: held-out bits
per byte at equal steps and at equal wall-clock time, held-out loss by position bucket (does the model use
far context?), tokens/s. Writes a JSON file, two PNG plots and prints a markdown table.

Defaults: 8 layers, embed 512, 8 heads (26M parameters, the README's GPU ``train`` size), 64K bytes a
step, bf16, 130 s of training per kind. One context per command; each should fit one 10-minute run on an
H200, start-up, warm-up and evaluations included (the total is printed at the end):

    python benchmarks/lm_quality.py --context 8192
    python benchmarks/lm_quality.py --context 32768

For equal tokens instead of equal time: ``--seconds 0 --steps 400``. A tiny CPU run (seconds):

    python benchmarks/lm_quality.py --smoke --json /tmp/lmq.json --img-dir /tmp
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dilated_attention_pytorch.bench.cli import git_commit
from dilated_attention_pytorch.models import LongNetLM, LongNetLMConfig
from dilated_attention_pytorch.training.data import Corpus, load_corpus
from dilated_attention_pytorch.training.train import (
    DTYPES, autocast, build_optimizer, position_losses, resolve_device,
)

KINDS = ("dense", "local", "dilated")
KIND_NAMES = {"dense": "dense causal (SDPA)", "local": "local (one pattern)", "dilated": "LongNet dilated"}
SMOKE = dict(context=64, window=16, buckets=(8, 32), embed_dim=32, layers=2, heads=2, batch_size=2, seconds=None,
             steps=4, warmup=1, eval_every=2, eval_tokens=256, device="cpu", dtype="float32")


@dataclass(frozen=True)
class QualityConfig:
    context: int = 8192
    kinds: tuple[str, ...] = KINDS
    seconds: Optional[float] = 130.0  # training wall clock per kind (evaluation not counted)
    steps: Optional[int] = None  # at most this many steps per kind
    window: int = 2048  # w of local attention; w / r of every dilated pattern
    buckets: tuple[int, ...] = (1024, 4096, 16384)  # position bucket edges (0 and the context added)
    embed_dim: int = 512
    layers: int = 8
    heads: int = 8
    batch_size: Optional[int] = None  # default: batch_tokens // context
    batch_tokens: int = 65536
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 40  # steps
    eval_tokens: int = 262144  # held-out bytes per evaluation (windows of the context)
    seed: int = 0
    device: str = "auto"
    dtype: str = "bfloat16"
    corpus: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("context", "window", "embed_dim", "layers", "heads", "batch_tokens", "eval_every", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, but got {getattr(self, name)}")
        if self.seconds is None and self.steps is None:
            raise ValueError("give a budget: seconds and steps are both None")
        if self.seconds is not None and self.seconds <= 0 or self.steps is not None and self.steps < 1:
            raise ValueError(f"seconds must be > 0 and steps >= 1, but got seconds={self.seconds}, steps={self.steps}")
        if not self.kinds or any(k not in KINDS for k in self.kinds) or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must be distinct names from {KINDS}, but got {self.kinds}")
        ratio = self.context // self.window
        if self.context % self.window or ratio & (ratio - 1):
            raise ValueError(f"context ({self.context}) must be window ({self.window}) times a power of two")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, but got {self.dtype!r}")
        if self.batch_size is None and self.batch_tokens < self.context:
            raise ValueError(f"batch_tokens ({self.batch_tokens}) must be >= context ({self.context})")

    @property
    def batch(self) -> int:
        return self.batch_size if self.batch_size is not None else self.batch_tokens // self.context

    @property
    def eval_windows(self) -> int:
        return max(1, self.eval_tokens // self.context)


def patterns(kind: str, context: int, window: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(segment lengths, dilation rates) of an attention kind."""
    if kind == "dense":
        return (context,), (1,)  # one segment, r = 1: dense causal attention (run by SDPA, see CausalSDPA)
    if kind == "local":
        return (window,), (1,)
    count = (context // window).bit_length()  # w = window * 2^i up to the context, r = 2^i
    return tuple(window << i for i in range(count)), tuple(1 << i for i in range(count))


class CausalSDPA(nn.Module):
    """Dense causal attention by ``F.scaled_dot_product_attention`` in the core layout ``(b, n, h, d)``."""

    def forward(self, q, k, v, is_causal: bool = True, key_padding_mask=None) -> torch.Tensor:
        if not is_causal or key_padding_mask is not None:
            raise ValueError("CausalSDPA computes causal attention without padding")
        q_bhnd, k_bhnd, v_bhnd = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q_bhnd, k_bhnd, v_bhnd, is_causal=True).transpose(1, 2)


def build_model(kind: str, cfg: QualityConfig, device: torch.device) -> LongNetLM:
    """The same weights for every kind (seeded); the dense kind's cores are swapped for :class:`CausalSDPA`."""
    segments, dilations = patterns(kind, cfg.context, cfg.window)
    torch.manual_seed(cfg.seed)
    model = LongNetLM(LongNetLMConfig(
        vocab_size=256, embed_dim=cfg.embed_dim, num_layers=cfg.layers, num_heads=cfg.heads,
        segment_lengths=segments, dilation_rates=dilations, positions="rotary",
    ))
    if kind == "dense":
        for layer in model.layers:
            layer.self_attn.attention = CausalSDPA()
    return model.to(device)


def lr_at(step: int, seconds: float, cfg: QualityConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine to ``min_lr_ratio * lr`` over the budget."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    fractions = [seconds / cfg.seconds] if cfg.seconds is not None else []
    if cfg.steps is not None:
        fractions.append((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    progress = min(1.0, max(fractions))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def bucket_edges(cfg: QualityConfig) -> list[int]:
    return [0] + [e for e in cfg.buckets if 0 < e < cfg.context] + [cfg.context]


def _size(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n else str(n)


def position_summary(losses: torch.Tensor, cfg: QualityConfig, curve_bins: int = 48) -> dict[str, Any]:
    """Per-position losses (nats, ``(n,)``) -> bits per byte by bucket, and a log-spaced curve for the plot."""
    bpb = losses / math.log(2)
    edges = bucket_edges(cfg)
    buckets = {f"{_size(a)}-{_size(b)}": bpb[a:b].mean().item() for a, b in zip(edges, edges[1:])}
    cuts = sorted({0, *(int(round(cfg.context ** (i / curve_bins))) for i in range(1, curve_bins + 1))})
    curve = [[(a + b + 1) / 2, bpb[a:b].mean().item()] for a, b in zip(cuts, cuts[1:])]  # x: bytes seen
    return {"buckets": buckets, "curve": curve}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_kind(kind: str, cfg: QualityConfig, corpus: Corpus, device: torch.device) -> dict[str, Any]:
    """Train one kind within the budget; held-out bits per byte every ``eval_every`` steps and at the end."""
    model = build_model(kind, cfg, device)
    opt_args = argparse.Namespace(lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizer = build_optimizer(model, opt_args)
    dtype = DTYPES[cfg.dtype]
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same batches for every kind
    val_x, val_y = corpus.val_windows(cfg.eval_windows, cfg.context)

    def step_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            logits = model(x.to(device))  # (b, n, 256)
        return F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())

    # Untimed warm-up: kernels load or compile; the gradients are dropped, the weights are untouched.
    warm_gen = torch.Generator().manual_seed(cfg.seed + 2)
    step_loss(*corpus.batch(cfg.batch, cfg.context, warm_gen)).backward()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def evaluate(step: int, seconds: float) -> None:
        last["losses"] = losses = position_losses(model, val_x, val_y, cfg.batch, device, dtype)  # (n,) nats
        train_bpb = sum(train_losses) / len(train_losses) / math.log(2) if train_losses else None
        train_losses.clear()
        history.append({"step": step, "seconds": round(seconds, 3), "bpb": losses.mean().item() / math.log(2),
                        "train_bpb": train_bpb})  # train_bpb: the mean over the steps since the last evaluation
        print(f"  {kind:8s} step {step:5d}  {seconds:7.1f} s  held-out {history[-1]['bpb']:.4f} bits/byte",
              flush=True)

    history: list[dict[str, float]] = []
    last: dict[str, torch.Tensor] = {}
    train_losses: list[float] = []
    evaluate(0, 0.0)
    model.train()
    step, elapsed = 0, 0.0
    while (cfg.steps is None or step < cfg.steps) and (cfg.seconds is None or elapsed < cfg.seconds):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, elapsed, cfg)
        loss = step_loss(*corpus.batch(cfg.batch, cfg.context, data_gen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        train_losses.append(loss.item())  # waits for the step
        elapsed += time.perf_counter() - t0
        step += 1
        if step % cfg.eval_every == 0:
            evaluate(step, elapsed)
    if history[-1]["step"] != step:
        evaluate(step, elapsed)
    segments, dilations = patterns(kind, cfg.context, cfg.window)
    return {
        "kind": kind, "attention": KIND_NAMES[kind], "segment_lengths": list(segments),
        "dilation_rates": list(dilations), "parameters": model.num_parameters(), "steps": step,
        "train_seconds": round(elapsed, 2), "tokens_per_s": step * cfg.batch * cfg.context / elapsed,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_bpb": history[-1]["bpb"], "val_history": history,
        "positions": position_summary(last["losses"], cfg),
    }


def _at_time(history: list[dict[str, float]], t: float) -> float:
    """Held-out bits per byte at training time ``t``, linear between evaluations."""
    for a, b in zip(history, history[1:]):
        if a["seconds"] <= t <= b["seconds"]:
            w = (t - a["seconds"]) / max(b["seconds"] - a["seconds"], 1e-9)
            return a["bpb"] + w * (b["bpb"] - a["bpb"])
    return history[-1]["bpb"]


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out bits per byte at the last step every kind evaluated, and at the shortest kind's wall clock;
    the drop over the last quarter of each run's time says how far from converged it still is."""
    common = set.intersection(*({h["step"] for h in r["val_history"]} for r in runs))
    step = max(common)
    seconds = min(r["train_seconds"] for r in runs)
    out: dict[str, Any] = {"equal_step": step, "equal_seconds": seconds, "by_kind": {}}
    for r in runs:
        at_step = next(h["bpb"] for h in r["val_history"] if h["step"] == step)
        drop = _at_time(r["val_history"], 0.75 * r["train_seconds"]) - r["final_bpb"]
        out["by_kind"][r["kind"]] = {"bpb_at_equal_step": at_step, "bpb_at_equal_seconds":
                                     _at_time(r["val_history"], seconds), "bpb_drop_last_quarter": drop}
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """The table for BENCHMARKS.md: one row per kind."""
    runs, cmp = result["runs"], result["comparison"]
    labels = list(runs[0]["positions"]["buckets"])
    head = (f"| attention | w / r | steps | tokens/s | bpb @ step {cmp['equal_step']} "
            f"| bpb @ {cmp['equal_seconds']:.3g} s | " + " | ".join(f"bpb {b}" for b in labels) + " |")
    lines = [head, "|---|---|---:|---:|---:|---:|" + "---:|" * len(labels)]
    for r in runs:
        c = cmp["by_kind"][r["kind"]]
        wr = ", ".join(f"{_size(w)}/{d}" for w, d in zip(r["segment_lengths"], r["dilation_rates"]))
        if r["kind"] == "dense":
            wr = "all"
        cells = " | ".join(f"{v:.3f}" for v in r["positions"]["buckets"].values())
        lines.append(f"| {r['attention']} | {wr} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
                     f"{c['bpb_at_equal_step']:.3f} | {c['bpb_at_equal_seconds']:.3f} | {cells} |")
    return "\n".join(lines)


def _figure(ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * ncols, 4), dpi=120)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def plot_time(result: dict[str, Any], path: Path) -> None:
    """Held-out bits per byte against training wall time (left) and step (right)."""
    fig, (ax_t, ax_s) = _figure(2)
    for r in result["runs"]:
        hist = r["val_history"]
        ax_t.plot([h["seconds"] for h in hist], [h["bpb"] for h in hist], "o-", ms=3, label=r["attention"])
        ax_s.plot([h["step"] for h in hist], [h["bpb"] for h in hist], "o-", ms=3, label=r["attention"])
    for ax, xlabel in ((ax_t, "training wall time (s)"), (ax_s, "step")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_t.set_title(f"LongNetLM, byte level, context {_size(result['config']['context'])}")
    fig.tight_layout()
    fig.savefig(path)


def plot_position(result: dict[str, Any], path: Path) -> None:
    """Held-out bits per byte against position in the window (log scale), at the end of training."""
    fig, (ax,) = _figure(1)
    for r in result["runs"]:
        pos, bpb = zip(*r["positions"]["curve"])
        ax.plot(pos, bpb, "o-", ms=3, label=r["attention"])
    ax.axvline(result["config"]["window"], color="gray", ls="--", lw=0.8, label=f"w = {result['config']['window']}")
    ax.set_xscale("log")
    ax.set_xlabel("bytes of context seen (position in the window + 1)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"Loss by position, context {_size(result['config']['context'])}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def run(cfg: QualityConfig) -> dict[str, Any]:
    """Train every kind of ``cfg.kinds``; the result that is written as JSON."""
    device = resolve_device(cfg.device)
    corpus = load_corpus(cfg.corpus, min_bytes=cfg.context + 2)
    print(f"corpus: {corpus.description}\ndevice: {device}, {cfg.dtype}; batch {cfg.batch} x {cfg.context} bytes; "
          f"budget {cfg.seconds} s / {cfg.steps} steps per kind", flush=True)
    runs, t0 = [], time.perf_counter()
    for kind in cfg.kinds:
        runs.append(train_kind(kind, cfg, corpus, device))
        r = runs[-1]
        print(f"{kind}: {r['steps']} steps in {r['train_seconds']} s, {r['tokens_per_s']:,.0f} tokens/s, "
              f"held-out {r['final_bpb']:.4f} bits/byte", flush=True)
    print(f"all kinds: {time.perf_counter() - t0:.0f} s, evaluations and warm-ups included", flush=True)
    return {
        "date": datetime.date.today().isoformat(), "commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__, "python": sys.version.split()[0], "corpus": corpus.description,
        "config": {**dataclasses.asdict(cfg), "batch": cfg.batch, "eval_windows": cfg.eval_windows},
        "runs": runs, "comparison": compare(runs),
    }


def build_parser() -> argparse.ArgumentParser:
    d = QualityConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=d.context)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(d.kinds))
    p.add_argument("--seconds", type=float, default=d.seconds, help="training wall clock per kind (0: no limit)")
    p.add_argument("--steps", type=int, default=d.steps, help="at most this many steps per kind")
    p.add_argument("--window", type=int, default=d.window, help="local w; w / r of the dilated patterns")
    p.add_argument("--buckets", type=int, nargs="+", default=list(d.buckets), help="position bucket edges")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default: --batch-tokens // --context")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out bytes per evaluation")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype, help="autocast dtype")
    p.add_argument("--corpus", default=None, help="a file or folder of text (default: the Python stdlib sources)")
    p.add_argument("--json", type=Path, default=None,
                   help="default: benchmarks/results/<date>-lm-quality-<context>.json")
    p.add_argument("--img-dir", type=Path, default=Path("docs/img"), help="folder of the two PNG plots")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (seconds): " + str(SMOKE))
    return p


def config_from_args(args: argparse.Namespace) -> QualityConfig:
    names = {f.name for f in dataclasses.fields(QualityConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["kinds"], values["buckets"] = tuple(values["kinds"]), tuple(values["buckets"])
    if values["seconds"] == 0:
        values["seconds"] = None
    if args.smoke:
        values.update(SMOKE)
    return QualityConfig(**values)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    result = run(cfg)
    tag = "smoke" if args.smoke else _size(cfg.context).lower()
    json_path = args.json or Path("benchmarks/results") / f"{result['date']}-lm-quality-{tag}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {json_path}")
    if args.plots:
        args.img_dir.mkdir(parents=True, exist_ok=True)
        for name, plot in (("time", plot_time), ("position", plot_position)):
            path = args.img_dir / f"lm_quality_{tag}_{name}.png"
            plot(result, path)
            print(f"wrote {path}")
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
