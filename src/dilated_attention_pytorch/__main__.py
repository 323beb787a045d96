"""Command line: ``python -m dilated_attention_pytorch demo``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": "dilated_attention_pytorch.demo"}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m dilated_attention_pytorch {{{','.join(commands)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    import importlib

    importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
