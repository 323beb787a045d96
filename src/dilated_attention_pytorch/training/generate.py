"""``python -m dilated_attention_pytorch generate``: sample bytes from a ``train`` checkpoint."""

from __future__ import annotations

import argparse
import os
from typing import Optional

import torch

from ..models import LongNetLM, LongNetLMConfig
from .checkpoint import CheckpointError, load_checkpoint

__all__ = ["load_model", "main"]


def load_model(path: str, device: Optional[str] = None) -> LongNetLM:
    """The LongNetLM saved in a ``train`` checkpoint (``checkpoint.pt`` or the folder holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.exists(path):
        raise ValueError(
            f"checkpoint {path!r} does not exist; train one with `python -m dilated_attention_pytorch train`"
        )
    ckpt = load_checkpoint(path, required=("config", "model"))
    try:
        model = LongNetLM(LongNetLMConfig.from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path!r} does not hold a valid LongNetLM: {err}") from err
    return model.to(device or "cpu").eval()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dilated_attention_pytorch generate", description=__doc__)
    p.add_argument("checkpoint", nargs="?", default="runs/longnet-lm", help="checkpoint.pt or its folder")
    p.add_argument("--prompt", default="def ", help="text to continue (utf-8 bytes)")
    p.add_argument("--num-samples", type=int, default=1, help="samples decoded together as one batch")
    p.add_argument("--max-new-bytes", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", default=None, help="stop a sample at this single byte/character, e.g. $'\\n\\n' ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p


def main(argv: Optional[list[str]] = None) -> list[str]:
    args = build_parser().parse_args(argv)
    model = load_model(args.checkpoint, args.device)
    prompt = args.prompt.encode("utf-8")
    if not prompt:
        raise ValueError("--prompt must not be empty")
    stop = None
    if args.stop is not None:
        stop_bytes = args.stop.encode("utf-8").decode("unicode_escape").encode("latin-1")
        if len(stop_bytes) != 1:
            raise ValueError(f"--stop must be one byte (e.g. '\\n'), but got {args.stop!r}")
        stop = stop_bytes[0]
    ids = torch.tensor([list(prompt)] * args.num_samples, dtype=torch.long, device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = model.generate(ids, args.max_new_bytes, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, stop_token=stop, generator=gen)
    texts = []
    for row in out.tolist():
        if stop is not None and stop in row[len(prompt):]:
            row = row[: len(prompt) + row[len(prompt):].index(stop) + 1]
        texts.append(bytes(row).decode("utf-8", errors="replace"))
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{text}")
    return texts


if __name__ == "__main__":
    main()
