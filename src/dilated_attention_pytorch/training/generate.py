"""``python -m dilated_attention_pytorch generate``: sample bytes from a ``train`` checkpoint."""

from __future__ import annotations

import argparse
import os
from typing import Optional

import torch

from .. import _cli
from .._cli import UsageError
from ..models import LongNetLM, LongNetLMConfig
from ..models.sampling import check_sampling
from .checkpoint import CheckpointError, load_checkpoint

__all__ = ["load_model", "main"]


def load_model(path: str, device: Optional[str] = None) -> LongNetLM:
    """The LongNetLM saved in a ``train`` checkpoint (``checkpoint.pt`` or the folder holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.exists(path):
        raise UsageError(
            f"checkpoint {os.path.abspath(path)!r} does not exist; give the path train printed as its output "
            "folder, or train one with `python -m dilated_attention_pytorch train` (it writes runs/longnet-lm "
            "under the folder it runs in)"
        )
    ckpt = load_checkpoint(path, required=("config", "model"))
    try:
        model = LongNetLM(LongNetLMConfig.from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path!r} does not hold a valid LongNetLM: {err}") from err
    return model.to(device or "cpu").eval()


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser("generate", __doc__)
    p.add_argument("checkpoint", nargs="?", default="runs/longnet-lm",
                   help="checkpoint.pt or the folder holding it (train's output folder)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue (utf-8 bytes); repeat it for several prompts, of any lengths, decoded "
                   "together in one batch (each as if alone); None = 'def '")
    p.add_argument("--num-samples", type=_cli.positive_int, default=1,
                   help="samples per prompt, all decoded together as one batch")
    p.add_argument("--max-new-bytes", type=int, default=300, help="bytes to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=_cli.positive_int, default=40, help="sample among the k likeliest bytes")
    p.add_argument("--top-p", type=float, default=None, help="sample among the likeliest bytes of this total "
                   "probability, in (0, 1]; None = off")
    p.add_argument("--stop", default=None, help="stop a sample after this byte; one character or escape, "
                   "e.g. '\\n' or $'\\n'; None = no stop byte")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    p.add_argument("--device", type=_cli.device, default="cpu", help="cpu, cuda, cuda:1, or auto")
    return p


def main(argv: Optional[list[str]] = None) -> list[str]:
    return _generate(build_parser().parse_args(argv))


def _generate(args: argparse.Namespace) -> list[str]:
    prompts = [text.encode("utf-8") for text in (args.prompt or ["def "])]
    if not all(prompts):
        raise UsageError("--prompt must not be empty")
    _cli.check(check_sampling, args.temperature, args.top_k, args.top_p)
    if args.max_new_bytes < 0:
        raise UsageError(f"--max-new-bytes must be >= 0, but got {args.max_new_bytes}")
    stop = None
    if args.stop is not None:
        try:
            stop_bytes = args.stop.encode("utf-8").decode("unicode_escape").encode("latin-1")
        except (UnicodeDecodeError, UnicodeEncodeError) as err:
            raise UsageError(f"--stop {args.stop!r} is not one byte: {err}") from err
        if len(stop_bytes) != 1:
            raise UsageError(f"--stop must be one byte (e.g. '\\n'), but got {args.stop!r} ({len(stop_bytes)} bytes)")
        stop = stop_bytes[0]
    device = _cli.resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    prompts = [p for p in prompts for _ in range(args.num_samples)]
    width = max(len(p) for p in prompts)  # left-padded to one width; the padding is never read
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(ids, args.max_new_bytes, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, stop_token=stop, generator=gen,
                         prompt_lengths=[len(p) for p in prompts])
    texts = []
    for prompt, row in zip(prompts, out.tolist()):
        new = row[width:]
        if stop is not None and stop in new:
            new = new[: new.index(stop) + 1]
        texts.append((prompt + bytes(new)).decode("utf-8", errors="replace"))
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{text}")
    return texts


if __name__ == "__main__":
    main()
