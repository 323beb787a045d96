"""The byte-level corpus: the Python standard library's own ``.py`` sources (on every machine, no download)
or a user-given file/directory; a deterministic held-out split; random training windows from a seeded
generator whose state is the data position saved in checkpoints."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Corpus", "load_corpus", "stdlib_sources"]

VAL_EVERY = 20  # every 20th file (in sorted order) is held out


def stdlib_sources() -> list[str]:
    """The top-level ``.py`` files of the running Python's standard library, sorted by name."""
    root = sysconfig.get_paths()["stdlib"]
    return sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py"))


def _files_of(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"corpus must be a file or a directory, but got {path!r}, which does not exist")
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith((".py", ".txt", ".md", ".rst"))]
    if not found:
        raise ValueError(f"corpus directory {path!r} holds no .py/.txt/.md/.rst files")
    return found


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 (n_train,)
    val: torch.Tensor  # uint8 (n_val,)
    sha256: str
    description: str
    train_files: Optional[torch.Tensor] = None  # int64 offsets in ``train`` where each training file starts

    def batch(self, batch_size: int, context: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random training windows: inputs and next-byte targets, int64 ``(batch, context)``."""
        x, y, _ = self.packed_batch(batch_size, context, generator)
        return x, y

    def packed_batch(self, batch_size: int, context: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`batch` (the same windows for the same generator state) and ``cu_seqlens`` over the
        ``batch * context`` flattened inputs: each window's pieces of files are documents."""
        starts = torch.randint(0, self.train.numel() - context - 1, (batch_size,), generator=generator).tolist()
        windows = torch.stack([self.train[s : s + context + 1] for s in starts]).long()
        files = torch.zeros(1, dtype=torch.int64) if self.train_files is None else self.train_files
        cu = [0]
        for row, s in enumerate(starts):
            inside = files[(files > s) & (files < s + context)] - s  # files starting inside the window
            cu += [row * context + int(p) for p in inside.tolist()] + [(row + 1) * context]
        return windows[:, :-1], windows[:, 1:], torch.tensor(cu, dtype=torch.int64)

    def val_windows(self, count: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` evenly spaced held-out windows (always the same ones)."""
        last = self.val.numel() - context - 1
        if last < 0:
            raise ValueError(f"the held-out split ({self.val.numel()} bytes) is shorter than context+1={context + 1}")
        starts = torch.linspace(0, last, count).long().tolist()
        windows = torch.stack([self.val[s : s + context + 1] for s in starts]).long()
        return windows[:, :-1], windows[:, 1:]


def load_corpus(path: Optional[str] = None, *, min_bytes: int = 0) -> Corpus:
    """Every ``VAL_EVERY``-th file is held out; files are joined with a blank line."""
    files = stdlib_sources() if path is None else _files_of(path)
    train_parts, val_parts = [], []
    for i, name in enumerate(files):
        with open(name, "rb") as fh:
            data = fh.read() + b"\n\n"
        (val_parts if i % VAL_EVERY == VAL_EVERY - 1 else train_parts).append(data)
    if not val_parts:  # a single file: hold out its last 5%
        whole = b"".join(train_parts)
        cut = len(whole) - max(1, len(whole) // 20)
        train_parts, val_parts = [whole[:cut]], [whole[cut:]]
    train_files = torch.tensor([0] + [len(p) for p in train_parts], dtype=torch.int64).cumsum(0)[:-1]
    train, val = b"".join(train_parts), b"".join(val_parts)
    if len(train) < min_bytes:
        raise ValueError(f"the corpus has {len(train)} training bytes, fewer than the {min_bytes} needed")
    digest = hashlib.sha256(train + b"\0" + val).hexdigest()
    where = f"python {sysconfig.get_python_version()} stdlib" if path is None else path
    return Corpus(
        torch.frombuffer(bytearray(train), dtype=torch.uint8), torch.frombuffer(bytearray(val), dtype=torch.uint8),
        digest, f"{where}: {len(files)} files, {len(train)} train / {len(val)} held-out bytes", train_files,
    )
