"""Checkpoints (issue 13, item 8): a format marker and a SHA-256 of the contents; every damaged, foreign or
crafted file gets an error naming it and what is wrong; pickles are never executed; ``--resume`` takes
file paths from the command line only."""

from __future__ import annotations

import os
import pickle
import random
import shutil

import pytest
import torch

from dilated_attention_pytorch.training import generate, train
from dilated_attention_pytorch.training.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)

TINY = ["--embed-dim", "8", "--heads", "2", "--layers", "1", "--context", "12", "--batch-size", "2",
        "--segments", "4", "8", "--dilations", "1", "2", "--eval-every", "2", "--eval-windows", "2",
        "--save-every", "1", "--warmup", "1", "--sample-bytes", "4", "--no-progress"]


def _text(seed: int) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(["def", "x", "=", "(", ")", "return", "1", ":"]) for _ in range(12))
                     for _ in range(60))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step run on a small corpus, stopped before its last step (resumable)."""
    root = tmp_path_factory.mktemp("ckpt")
    corpus = root / "corpus.txt"
    corpus.write_text(_text(random.randrange(1 << 30)))
    out = root / "run"
    train.main(TINY + ["--out", str(out), "--steps", "2", "--stop-after", "1", "--corpus", str(corpus)])
    return out / "checkpoint.pt", corpus


@pytest.fixture
def run_dir(trained, tmp_path):
    """A fresh copy of the trained run's folder, to damage."""
    ckpt, corpus = trained
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(ckpt, out / "checkpoint.pt")
    return out, corpus


def test_checkpoint_has_a_format_marker_and_a_digest_that_loads(trained):
    ckpt, _ = trained
    raw = torch.load(ckpt, weights_only=True)
    assert raw["format"] == FORMAT and raw["format_version"] == 1 and len(raw["sha256"]) == 64
    record = load_checkpoint(str(ckpt), required=("model", "config"))
    assert record["step"] == 1
    model = generate.load_model(str(ckpt))
    assert model.config.embed_dim == 8


def _flip_tensor_byte(path):
    """Flip one byte inside a model tensor's stored data (the zip stores tensors uncompressed)."""
    record = torch.load(path, weights_only=True)
    tensor = record["model"]["embed.weight"]
    data = bytearray(open(path, "rb").read())
    at = data.find(tensor.numpy().tobytes()[:64])
    assert at > 0
    data[at + 5] ^= 0x10
    open(path, "wb").write(bytes(data))


def _resave(path, change):
    record = torch.load(path, weights_only=True)
    payload = {k: v for k, v in record.items() if k not in ("format", "format_version", "sha256")}
    change(payload)
    save_checkpoint(str(path), payload)


class _Evil:
    def __reduce__(self):
        return (open, (os.environ["EVIL_MARKER"], "w"))


def _evil(path):
    torch.save({"format": FORMAT, "model": _Evil()}, path)


def _plain_pickle(path):
    with open(path, "wb") as fh:
        pickle.dump({"format": FORMAT, "model": _Evil()}, fh)  # a pickle, not a torch.save archive


DAMAGE = {
    "empty": (lambda p: open(p, "wb").close(), "is empty"),
    "truncated": (lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2), "is truncated or damaged"),
    "text": (lambda p: open(p, "w").write("step: 3\nmodel: weights\n"), "is not a checkpoint of this format"),
    "foreign torch file": (lambda p: torch.save({"config": {}, "model": {}}, p), "is not a checkpoint of this format"),
    "a list": (lambda p: torch.save([1, 2], p), "is not a checkpoint of this format"),
    "flipped byte": (_flip_tensor_byte, "is corrupted: the SHA-256"),
    "missing keys": (lambda p: _resave(p, lambda d: d.pop("model")), r"lacks the entries \['model'\]"),
    "pickled code": (_evil, "could not be read.*pickled code is never executed"),
    "plain pickle": (_plain_pickle, "is not a checkpoint of this format"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_damaged_checkpoint_is_named_with_its_fault(damage, run_dir, tmp_path, monkeypatch):
    out, corpus = run_dir
    path = out / "checkpoint.pt"
    marker = tmp_path / "executed"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    make, match = DAMAGE[damage]
    make(str(path))
    where = rf"{str(path)!r}.*{match}".replace("\\\\", "\\\\\\\\")  # the path as repr'd in the message
    with pytest.raises(CheckpointError, match=where):
        generate.load_model(str(out))
    with pytest.raises(CheckpointError, match=where):
        train.main(["--out", str(out), "--resume", "--steps", "2", "--corpus", str(corpus), "--no-progress"])
    assert not marker.exists()  # the pickle's code never ran


def test_resume_takes_file_paths_only_from_the_command_line(run_dir, tmp_path):
    out, corpus = run_dir
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text(_text(7))
    # a checkpoint whose args point at another file and folder (e.g. crafted, or copied from another machine)
    _resave(out / "checkpoint.pt", lambda d: d["args"].update(corpus=str(elsewhere), out=str(tmp_path / "other")))
    # without --corpus the default corpus is used, never the path saved in the checkpoint
    with pytest.raises(ValueError, match=r"corpus .* differs from the one checkpoint .* --corpus"):
        train.main(["--out", str(out), "--resume", "--steps", "2", "--no-progress"])
    summary = train.main(["--out", str(out), "--resume", "--steps", "2", "--corpus", str(corpus), "--no-progress"])
    assert summary["step"] == 2 and str(corpus) in summary["corpus"]
    assert not (tmp_path / "other").exists()
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 2


def test_crafted_args_are_rejected(run_dir):
    out, corpus = run_dir
    _resave(out / "checkpoint.pt", lambda d: d["args"].update(evil=1))
    with pytest.raises(CheckpointError, match=r"holds args .*not the settings of this train command"):
        train.main(["--out", str(out), "--resume", "--steps", "2", "--corpus", str(corpus), "--no-progress"])
