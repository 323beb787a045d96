"""The ``train`` / ``generate`` / ``info`` commands: exact resume, outputs, and the backend report."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dilated_attention_pytorch import info
from dilated_attention_pytorch.training import generate, train
from dilated_attention_pytorch.training.data import load_corpus, stdlib_sources

TINY = ["--embed-dim", "16", "--heads", "2", "--layers", "2", "--context", "24", "--batch-size", "3",
        "--segments", "4", "8", "--dilations", "1", "2", "--eval-every", "3", "--eval-windows", "4",
        "--save-every", "2", "--warmup", "2", "--dropout", "0.1", "--sample-bytes", "12", "--no-progress"]


def _history(out_dir):
    ckpt = torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=True)
    return ckpt["history"], ckpt["step"]


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    train.main(TINY + ["--out", whole, "--steps", "7"])
    train.main(TINY + ["--out", split, "--steps", "7", "--stop-after", "4"])
    part, step = _history(split)
    assert step == 4 and len(part["train"]) == 4
    train.main(["--out", split, "--resume", "--steps", "7", "--no-progress"])  # settings come from the checkpoint
    a, _ = _history(whole)
    b, step = _history(split)
    assert step == 7
    assert a["train"] == b["train"]  # exactly the same losses (dropout on: RNG states restored too)
    assert a["val"] == b["val"] and [s for s, _ in a["val"]] == [3, 6, 7]
    ckpt_a = torch.load(os.path.join(whole, "checkpoint.pt"), weights_only=True)
    ckpt_b = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=True)
    for name, tensor in ckpt_a["model"].items():
        assert torch.equal(tensor, ckpt_b["model"][name]), name
    metrics = json.loads(open(os.path.join(split, "metrics.json")).read())
    assert metrics["val_bpb"] == a["val"][-1][1] and metrics["sample"].startswith("def ")
    assert os.path.getsize(os.path.join(split, "loss.png")) > 1000
    with open(os.path.join(split, "loss.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    texts = generate.main([split, "--prompt", "import ", "--num-samples", "2", "--max-new-bytes", "10",
                           "--seed", "3"])
    assert len(texts) == 2 and all(t.startswith("import ") for t in texts)
    again = generate.main([split, "--prompt", "import ", "--num-samples", "2", "--max-new-bytes", "10",
                           "--seed", "3"])
    assert again == texts
    greedy = generate.main([split, "--prompt", "x", "--max-new-bytes", "30", "--temperature", "0", "--stop", "e"])
    body = greedy[0][1:].encode()
    assert b"e" not in body[:-1]  # ends at the first stop byte, if any


def test_train_errors(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        train.main(["--out", str(tmp_path / "none"), "--resume", "--no-progress"])
    with pytest.raises(ValueError, match="--stop-after"):
        train.main(TINY + ["--out", str(tmp_path / "x"), "--steps", "3", "--stop-after", "5"])
    with pytest.raises(ValueError, match="does not exist"):
        generate.main([str(tmp_path / "missing")])


def test_default_corpus_is_the_stdlib_with_a_held_out_split():
    files = stdlib_sources()
    assert files == sorted(files) and len(files) > 50
    corpus = load_corpus()
    assert corpus.train.numel() > 1_000_000 and corpus.val.numel() > 50_000
    assert load_corpus().sha256 == corpus.sha256  # deterministic
    gen = torch.Generator().manual_seed(0)
    x, y = corpus.batch(2, 16, gen)
    assert x.shape == y.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_info_lists_every_backend_and_why(capsys):
    rows = info.main([])
    text = capsys.readouterr().out
    names = {r.name for r in rows}
    assert {"cuda", "triton", "torch.distributed", "cpu_flash", "cuda_flash", "math", "standard", "improved",
            "ring", "distributed", "block_sparse", "auto", "[hf]", "[triton]", "[deepspeed]", "fused"} <= names
    assert "auto -> " in text
    for row in rows:
        assert row.detail, row  # every entry says why
    cpu_flash = [r for r in rows if r.name == "cpu_flash" and "cpu float32" in r.section][0]
    assert cpu_flash.available
    if not torch.cuda.is_available():
        cuda = [r for r in rows if r.name == "cuda"][0]
        assert not cuda.available and cuda.detail
