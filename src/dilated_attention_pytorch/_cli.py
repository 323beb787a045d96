"""What every command of ``python -m dilated_attention_pytorch`` shares: help that shows each option's
default, plain-text descriptions, argument types that reject bad values, and one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import re
from typing import Any, Callable

import torch

PROG = "python -m dilated_attention_pytorch"
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(ValueError):
    """A mistake in what the command line asked for: ``python -m dilated_attention_pytorch`` prints it on
    one line and exits with status 2 (as it does for an unreadable checkpoint); called as functions, the
    commands raise it."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; every option's help ends with its default."""


class Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: ``<prog>: error: <message>``, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} ('{self.prog} --help' lists the options)\n")


def plain(doc: str) -> str:
    """A docstring without reStructuredText markup: ``x`` and :role:`~a.b` become x and b."""
    doc = re.sub(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", doc)
    return doc.replace("``", "")


def parser(command: str, doc: str) -> argparse.ArgumentParser:
    return Parser(prog=f"{PROG} {command}", description=plain(doc), formatter_class=HelpFormatter)


def check(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a library argument check; its ValueError/TypeError (which names the argument) is a UsageError."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err


def positive_int(text: str) -> int:
    value = int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, but got {text!r}")
    return value


def device(text: str) -> str:
    """``auto`` (CUDA if available, else CPU) or a torch device that exists here; returns the name."""
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise argparse.ArgumentTypeError(f"{text!r}: {why}; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} GPU(s) here")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    return text


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
