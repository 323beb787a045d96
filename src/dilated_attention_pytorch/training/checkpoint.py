"""Checkpoint files of the ``train`` command: a format marker, a SHA-256 of the contents, and load errors
that name the file and what is wrong with it.

A checkpoint is one ``torch.save`` zip archive holding a flat dict: the payload's keys plus ``"format"``,
``"format_version"`` and ``"sha256"``, the digest of everything else (every tensor's dtype, shape and
bytes and every other value, in a fixed order). Loading runs ``torch.load(weights_only=True)``, so no
pickled code is ever executed, and then checks the marker, the version, the digest and the keys.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from typing import Any, Iterable

import torch

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointError", "contents_sha256", "load_checkpoint", "save_checkpoint"]

FORMAT = "dilated-attention-pytorch/longnet-lm-checkpoint"
FORMAT_VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"  # every torch.save archive begins with a zip local file header
# What torch.load raises on a zip archive whose entries or pickle are damaged or crafted.
_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, IndexError, ValueError, TypeError,
                AttributeError, zipfile.BadZipFile)


class CheckpointError(ValueError):
    """The file is not a readable checkpoint of this format; the message names the file and the fault."""


def _feed(digest: "hashlib._Hash", value: Any) -> None:
    """Add ``value`` to ``digest``: containers in order, tensors by dtype, shape and bytes, the rest by repr."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"tensor:{t.dtype}:{tuple(value.shape)}:".encode())
        digest.update(t.view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        digest.update(f"dict:{len(value)}:".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"list:{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:
        text = repr(value)
        digest.update(f"{type(value).__name__}:{len(text)}:{text}".encode())


def contents_sha256(record: dict[str, Any]) -> str:
    """The SHA-256 of a checkpoint's contents: every key but ``"sha256"``, in the dict's order."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in record.items() if k != "sha256"})
    return digest.hexdigest()


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors, dicts, lists and plain values) with the format marker and digest;
    atomically (a temporary file, then a rename)."""
    reserved = sorted({"format", "format_version", "sha256"} & set(payload))
    if reserved:
        raise ValueError(f"payload keys {reserved} are reserved for the checkpoint format")
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    record["sha256"] = contents_sha256(record)
    tmp = path + ".tmp"
    torch.save(record, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, required: Iterable[str] = ()) -> dict[str, Any]:
    """The contents of checkpoint ``path``, checked: a readable archive of this format and version, an
    intact digest and the ``required`` keys. Raises :class:`CheckpointError` naming the file otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): not a checkpoint of this format")
    with open(path, "rb") as fh:
        head = fh.read(len(_ZIP_MAGIC))
    if head != _ZIP_MAGIC:
        raise CheckpointError(
            f"{path!r} is not a checkpoint of this format: it does not begin like a torch.save archive "
            f"(first bytes {head!r}; a text file or another format?)"
        )
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path!r} is truncated or damaged: its zip archive has no end record ({size} bytes)"
        )
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"checkpoint {path!r} could not be read, it is corrupted or not a checkpoint of this format "
            f"({type(err).__name__}: {first_line}); pickled code is never executed"
        ) from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        what = f"a dict with keys {sorted(map(str, record))[:8]}" if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(
            f"{path!r} is not a checkpoint of this format: it holds {what}, without the marker "
            f"format={FORMAT!r}"
        )
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {record.get('format_version')!r}; this version reads "
            f"version {FORMAT_VERSION}"
        )
    if not isinstance(record.get("sha256"), str) or record["sha256"] != contents_sha256(record):
        raise CheckpointError(
            f"checkpoint {path!r} is corrupted: the SHA-256 of its contents does not match the one stored "
            "when it was written"
        )
    missing = [key for key in required if key not in record]
    if missing:
        raise CheckpointError(
            f"checkpoint {path!r} lacks the entries {missing}: not a complete checkpoint of this format"
        )
    return record
