"""Command line: ``python -m dilated_attention_pytorch {bench,demo,generate,info,train} [options]``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "bench": "dilated_attention_pytorch.bench.cli",
    "demo": "dilated_attention_pytorch.demo",
    "generate": "dilated_attention_pytorch.training.generate",
    "info": "dilated_attention_pytorch.info",
    "train": "dilated_attention_pytorch.training.train",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m dilated_attention_pytorch {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
