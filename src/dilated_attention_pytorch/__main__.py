"""Command line: ``python -m dilated_attention_pytorch COMMAND [options]``; ``COMMAND --help`` for each."""

from __future__ import annotations

import argparse
import importlib
import sys

from ._cli import PROG, Parser, UsageError
from .training.checkpoint import CheckpointError

# command -> (module with main(argv), what it does)
COMMANDS = {
    "bench": ("dilated_attention_pytorch.bench.cli",
              "time dilated attention against dense attention and the dense ceiling; writes a table, JSON, CSV "
              "and two plots"),
    "demo": ("dilated_attention_pytorch.demo", "one call on random data, timed and checked against the float64 "
             "reference"),
    "info": ("dilated_attention_pytorch.info", "every backend, kernel and optional package: usable here or not, "
             "and why"),
    "train": ("dilated_attention_pytorch.training.train", "train a byte-level LongNetLM on the Python standard "
              "library's sources (no download)"),
    "generate": ("dilated_attention_pytorch.training.generate", "sample text from a checkpoint that train wrote"),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    p = Parser(
        prog=PROG, usage=f"{PROG} [-h] [--version] COMMAND [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Exact LongNet dilated attention for PyTorch: benchmarks, checks and a small language model.",
        epilog=f"commands:\n{listing}\n\n'{PROG} COMMAND --help' lists a command's options and their defaults.",
    )
    p.add_argument("--version", action="version", version=f"dilated-attention-pytorch {__version__}")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the options before the command and the command are ours; everything after it is the command's
    end = next((i + 1 for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    args = build_parser().parse_args(argv[:end])
    command = importlib.import_module(COMMANDS[args.command][0])
    try:
        command.main(argv[end:])
    except (UsageError, CheckpointError) as err:  # a mistake in what was asked: one line, exit status 2
        command.build_parser().error(str(err))


if __name__ == "__main__":
    main()
