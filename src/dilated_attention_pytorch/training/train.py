"""``python -m dilated_attention_pytorch train``: a byte-level LongNetLM on the Python standard library's sources.

The default run takes a few minutes on a 2-core CPU. Writes to ``--out``: ``checkpoint.pt`` (model,
optimizer, RNG states, data position, loss history, with a format marker and a SHA-256 checked on
load, see :mod:`.checkpoint`; ``--resume`` continues it exactly), ``loss.png``
and ``metrics.json`` (validation bits-per-byte, time, a generated sample). Scale up on a GPU with e.g.
``--device cuda --dtype bfloat16 --context 8192 --segments 1024 2048 4096 8192 --dilations 1 2 4 8
--embed-dim 512 --layers 8 --heads 8 --batch-size 8 --steps 3000``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .. import _cli
from .._cli import UsageError
from .._validation import check_dropout, check_patterns
from ..models import LongNetLM, LongNetLMConfig
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import Corpus, load_corpus

__all__ = [
    "DTYPES", "autocast", "build_optimizer", "build_parser", "evaluate", "learning_rate", "main", "position_losses",
    "resolve_device", "run",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# On --resume the checkpoint's settings win, except these, which the command line gives: how far to go,
# and every file path (a checkpoint never points the run at a file: "out" and "corpus" are paths).
_RESUMABLE_OVERRIDES = ("steps", "stop_after", "progress", "resume")
_PATH_ARGS = ("out", "corpus")
_CHECKPOINT_KEYS = ("model", "optimizer", "config", "args", "step", "rng", "history", "corpus_sha256", "elapsed_s")


def build_parser() -> argparse.ArgumentParser:
    pos = _cli.positive_int
    p = _cli.parser("train", __doc__)
    p.add_argument("--out", default="runs/longnet-lm", help="folder for checkpoint.pt, loss.png, metrics.json "
                   "(relative to the current folder)")
    p.add_argument("--resume", action="store_true", help="continue --out/checkpoint.pt (its settings win, except "
                   "--steps, --stop-after, --no-progress and the paths --out and --corpus, which come from the command "
                   "line; with the same --steps the losses equal an uninterrupted run's)")
    p.add_argument("--corpus", default=None, help="a file or folder of text (default: the Python stdlib sources)")
    p.add_argument("--steps", type=pos, default=600, help="optimizer steps in the whole run")
    p.add_argument("--stop-after", type=pos, default=None, help="stop (and save) after this step, e.g. to resume")
    p.add_argument("--batch-size", type=pos, default=16, help="sequences per step")
    p.add_argument("--context", type=pos, default=256, help="bytes per training sequence")
    p.add_argument("--embed-dim", type=pos, default=128, help="model width")
    p.add_argument("--layers", type=pos, default=4, help="decoder layers")
    p.add_argument("--heads", type=pos, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=pos, default=None, help="key/value heads (grouped-query; default: --heads)")
    p.add_argument("--segments", type=pos, nargs="+", default=[64, 128, 256], help="segment length w of each pattern")
    p.add_argument("--dilations", type=pos, nargs="+", default=[1, 2, 4], help="dilation rate r of each pattern")
    p.add_argument("--positions", choices=["rotary", "xpos"], default="rotary", help="position encoding")
    p.add_argument("--attention-type", default="standard", choices=["standard", "improved", "auto", "block_sparse"],
                   help="attention implementation (auto: improved on a GPU whose fused path fits, else standard)")
    p.add_argument("--pack-documents", action="store_true", help="each training window's pieces of corpus files "
                   "are separate documents (cu_seqlens): no attention across a file boundary, positions restart")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=40, help="linear warm-up steps, then cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--eval-every", type=pos, default=100, help="steps between held-out evaluations")
    p.add_argument("--eval-windows", type=pos, default=64, help="held-out windows per evaluation")
    p.add_argument("--save-every", type=pos, default=100, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="random seed (model, data order, sample)")
    p.add_argument("--device", type=_cli.device, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype (params stay float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--sample-bytes", type=int, default=300, help="bytes sampled after the last step (0: none)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar: one line per evaluation instead")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "context", "eval_every", "eval_windows", "save_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        raise UsageError(f"--stop-after must be in [1, --steps={args.steps}], but got {args.stop_after}")
    if args.warmup < 0 or not 0 <= args.min_lr_ratio <= 1:
        raise UsageError(f"--warmup must be >= 0 and --min-lr-ratio in [0, 1], got {args.warmup}, {args.min_lr_ratio}")
    if args.kv_heads is not None and args.heads % args.kv_heads:
        raise UsageError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.embed_dim % args.heads:
        raise UsageError(f"--embed-dim ({args.embed_dim}) must be a multiple of --heads ({args.heads})")
    _cli.check(check_patterns, args.segments, args.dilations)
    _cli.check(check_dropout, "--dropout", args.dropout)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``, ...; CUDA asked for but absent is a usage error."""
    device = _cli.resolve_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for CUDA, but torch.cuda.is_available() is False")
    return device


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95), ``args.lr``; ``args.weight_decay`` on matrices other than the embedding."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith("embed"))]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device`` (off for float32: parameters stay float32 either way)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def position_losses(model: LongNetLM, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """Mean next-byte loss (nats) at each position of the windows ``x, y (count, n)``: float64 ``(n,)``."""
    was_training = model.training
    model.eval()
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        with autocast(device, dtype):
            logits = model(xb)  # (b, n, 256)
        loss = F.cross_entropy(logits.float().transpose(1, 2), yb, reduction="none")  # (b, n)
        total += loss.double().sum(0).cpu()
    model.train(was_training)
    return total / x.shape[0]


def evaluate(model: LongNetLM, corpus: Corpus, args: argparse.Namespace, device: torch.device) -> float:
    """Held-out bits per byte on fixed windows (every position predicts the next byte)."""
    x, y = corpus.val_windows(args.eval_windows, args.context)
    return position_losses(model, x, y, args.batch_size, device, DTYPES[args.dtype]).mean().item() / math.log(2)


def _rng_state(device: torch.device, data_gen: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device, data_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if device.type == "cuda":
        if "cuda" not in state:
            raise UsageError("the checkpoint was written on CPU; resume it on CPU for an exact continuation")
        torch.cuda.set_rng_state(state["cuda"], device)


def plot_losses(history: dict[str, list], path: str) -> None:
    """Training and held-out bits-per-byte against step, as a PNG (matplotlib, no global state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("the loss curve needs matplotlib: pip install 'dilated-attention-pytorch[bench]'") from err
    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if history["train"]:
        steps, losses = zip(*history["train"])
        ax.plot(steps, [v / math.log(2) for v in losses], lw=0.8, alpha=0.7, label="train")
    if history["val"]:
        steps, bpb = zip(*history["val"])
        ax.plot(steps, bpb, "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title("LongNetLM, byte level")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def sample_text(model: LongNetLM, prompt: str, n_bytes: int, *, seed: int, temperature: float = 0.8,
                top_k: Optional[int] = 40, device: Optional[torch.device] = None) -> str:
    ids = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.long, device=device)
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    out = model.generate(ids, n_bytes, temperature=temperature, top_k=top_k, generator=gen)
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


def _resumed_args(saved: Any, given: argparse.Namespace, path: str) -> argparse.Namespace:
    """The checkpoint's settings, with the command line's ``_RESUMABLE_OVERRIDES`` and file paths."""
    expected = set(vars(build_parser().parse_args([])))
    if isinstance(saved, dict):
        saved = {"pack_documents": False, **saved}  # checkpoints from before --pack-documents
    if not isinstance(saved, dict) or set(saved) != expected:
        keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"checkpoint {path!r} holds args {keys}, not the settings of this train command")
    merged = dict(saved)
    for name in _RESUMABLE_OVERRIDES + _PATH_ARGS:
        merged[name] = getattr(given, name)
    return argparse.Namespace(**merged)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) as ``args`` say; returns the summary also written to ``metrics.json``."""
    _check_args(args)
    print(f"output folder: {os.path.abspath(args.out)}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    ckpt = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise UsageError(f"--resume: no checkpoint at {os.path.abspath(ckpt_path)}")
        ckpt = load_checkpoint(ckpt_path, required=_CHECKPOINT_KEYS)
        args = _resumed_args(ckpt["args"], args, ckpt_path)
        _check_args(args)
    device = resolve_device(args.device)
    corpus = load_corpus(args.corpus, min_bytes=args.context + 2)
    if ckpt is not None and ckpt["corpus_sha256"] != corpus.sha256:
        raise UsageError(
            f"--resume: the corpus ({corpus.description}) differs from the one checkpoint {ckpt_path!r} was "
            "trained on (sha256 mismatch); pass the original run's --corpus"
        )

    torch.manual_seed(args.seed)
    config = LongNetLMConfig(
        vocab_size=256, embed_dim=args.embed_dim, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, segment_lengths=tuple(args.segments), dilation_rates=tuple(args.dilations),
        positions=args.positions, dropout=args.dropout, attention_type=args.attention_type,
    )
    model = LongNetLM(config).to(device)
    optimizer = build_optimizer(model, args)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    history: dict[str, list] = {"train": [], "val": []}
    start, elapsed = 0, 0.0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {ckpt_path!r} does not fit the model it describes: {err}") from err
        try:
            _set_rng_state(ckpt["rng"], device, data_gen)
        except (RuntimeError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {ckpt_path!r} holds unusable RNG states: {err!r}") from err
        history, start, elapsed = ckpt["history"], ckpt["step"], ckpt["elapsed_s"]
    step_fn = torch.compile(model) if args.compile else model
    stop = args.steps if args.stop_after is None else args.stop_after

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config.to_dict(),
            "args": vars(args), "step": step, "rng": _rng_state(device, data_gen), "history": history,
            "corpus_sha256": corpus.sha256, "elapsed_s": elapsed,
        })

    if start == 0:
        print(f"corpus: {corpus.description}\nmodel: {model.num_parameters():,} parameters, {config}", flush=True)
    else:
        print(f"resuming at step {start} of {args.steps}", flush=True)
    bar = None
    if args.progress:
        try:
            from tqdm import tqdm
        except ImportError as err:
            raise ImportError("progress bars need tqdm: pip install 'dilated-attention-pytorch[bench]' "
                              "(or pass --no-progress)") from err
        bar = tqdm(total=stop, initial=start, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    t0 = time.perf_counter()
    for step in range(start, stop):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        x, y, cu = (t.to(device) for t in corpus.packed_batch(args.batch_size, args.context, data_gen))
        with autocast(device, DTYPES[args.dtype]):
            logits = step_fn(x, cu_seqlens=cu) if args.pack_documents else step_fn(x)  # (b, n, 256)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        history["train"].append([step + 1, loss.item()])
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            history["val"].append([done, evaluate(model, corpus, args, device)])
            if bar is None:
                recent = [v for _, v in history["train"][-args.eval_every:]]
                print(f"step {done}/{args.steps}: train {sum(recent) / len(recent) / math.log(2):.3f} bits/byte "
                      f"(mean of the last {len(recent)} steps), held-out {history['val'][-1][1]:.3f} bits/byte, "
                      f"{elapsed + time.perf_counter() - t0:.0f} s", flush=True)
        if bar is not None:
            post = {"bpb": f"{loss.item() / math.log(2):.3f}"}
            if history["val"]:
                post["val_bpb"] = f"{history['val'][-1][1]:.3f}"
            bar.set_postfix(post)
            bar.update(1)
        if done % args.save_every == 0 or done == stop:
            elapsed_now = elapsed + time.perf_counter() - t0
            elapsed, t0 = elapsed_now, time.perf_counter()
            checkpoint(done)
    if bar is not None:
        bar.close()
    elapsed += time.perf_counter() - t0
    plot_losses(history, os.path.join(args.out, "loss.png"))
    summary: dict[str, Any] = {
        "out": os.path.abspath(args.out),
        "step": stop, "steps": args.steps, "train_seconds": round(elapsed, 1), "device": str(device),
        "dtype": args.dtype, "parameters": model.num_parameters(), "corpus": corpus.description,
        "final_train_bpb": history["train"][-1][1] / math.log(2) if history["train"] else None,
        "val_bpb": history["val"][-1][1] if history["val"] else None, "val_history": history["val"],
        "config": config.to_dict(),
    }
    if stop == args.steps and args.sample_bytes > 0:
        summary["sample_prompt"] = "def "
        summary["sample"] = sample_text(model, "def ", args.sample_bytes, seed=args.seed, device=device)
    with open(os.path.join(args.out, "metrics.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    summary = run(build_parser().parse_args(argv))
    if summary["step"] < summary["steps"]:
        print(f"stopped at step {summary['step']} of {summary['steps']}; continue with --resume")
    else:
        print(f"trained {summary['steps']} steps in {summary['train_seconds']} s on {summary['device']}: "
              f"held-out {summary['val_bpb']:.3f} bits/byte")
        if "sample" in summary:
            print("--- sample ---\n" + summary["sample"])
    print(f"wrote checkpoint.pt, loss.png and metrics.json in {summary['out']}")
    return summary


if __name__ == "__main__":
    main()
