"""LongNetLM on packed documents: each document's logits equal those of the document alone (attention and
positions restart per document), and gradients flow; the corpus packs files as documents."""

from __future__ import annotations

import random

import pytest
import torch

from dilated_attention_pytorch import LongNetLM
from dilated_attention_pytorch.models.positions import document_positions


def cu_of(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)


@pytest.mark.parametrize("positions", ["rotary", "xpos"])
def test_packed_documents_equal_each_document_alone(positions):
    torch.manual_seed(random.randrange(1 << 30))
    model = LongNetLM(vocab_size=50, embed_dim=32, num_layers=2, num_heads=4, segment_lengths=(4, 8, 16),
                      dilation_rates=(1, 2, 4), positions=positions).double().eval()
    lengths = [random.randint(1, 30) for _ in range(4)]
    ids = torch.randint(0, 50, (1, sum(lengths)))
    logits = model(ids, cu_seqlens=cu_of(lengths))
    start = 0
    for n in lengths:
        alone = model(ids[:, start:start + n])
        torch.testing.assert_close(logits[:, start:start + n], alone, rtol=1e-10, atol=1e-10)
        start += n


def test_packed_rows_of_a_batch_and_gradients():
    """cu_seqlens over the flattened (b * n) tokens: two rows, each its own documents."""
    model = LongNetLM(vocab_size=50, embed_dim=32, num_layers=1, num_heads=4, segment_lengths=(4, 8),
                      dilation_rates=(1, 2)).double()
    ids = torch.randint(0, 50, (2, 20))
    cut = random.randint(1, 19)
    cu = torch.tensor([0, cut, 20, 40])
    logits = model(ids, cu_seqlens=cu)
    torch.testing.assert_close(logits[0, :cut], model(ids[:1, :cut])[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits[1], model(ids[1:])[0], rtol=1e-10, atol=1e-10)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_document_positions_restart_at_each_document():
    assert document_positions(torch.tensor([0, 3, 4, 7]), 7).tolist() == [0, 1, 2, 0, 0, 1, 2]


def test_packed_with_a_decoding_state_is_rejected():
    model = LongNetLM(vocab_size=50, embed_dim=32, num_layers=1, num_heads=4, segment_lengths=(4,), dilation_rates=(1,))
    with pytest.raises(ValueError, match="packed documents"):
        model(torch.randint(0, 50, (1, 6)), model.new_state(1), cu_seqlens=torch.tensor([0, 2, 6]))


def test_corpus_packed_batch_marks_file_starts(tmp_path):
    from dilated_attention_pytorch.training.data import load_corpus

    sizes = [random.randint(5, 40) for _ in range(25)]
    for i, size in enumerate(sizes):
        (tmp_path / f"f{i:02d}.txt").write_bytes(bytes(random.randrange(97, 123) for _ in range(size)))
    corpus = load_corpus(str(tmp_path))
    files = corpus.train_files.tolist()
    assert files[0] == 0 and len(files) == len(sizes) - 1  # one file is held out
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x, y = corpus.batch(4, 16, g1)
    px, py, cu = corpus.packed_batch(4, 16, g2)
    assert torch.equal(x, px) and torch.equal(y, py)  # the same windows: resuming is unaffected
    assert cu[0] == 0 and cu[-1] == 4 * 16 and bool((cu[1:] > cu[:-1]).all())
    assert all(r * 16 in cu.tolist() for r in range(5))  # documents never cross rows
    flat = x.flatten()
    train = corpus.train.long()
    starts = torch.randint(0, train.numel() - 17, (4,), generator=torch.Generator().manual_seed(3)).tolist()
    for row, s in enumerate(starts):
        inside = {f - s for f in files if s < f < s + 16}
        marked = {c - row * 16 for c in cu.tolist() if row * 16 < c < (row + 1) * 16}
        assert inside == marked
        assert torch.equal(flat[row * 16:(row + 1) * 16], train[s:s + 16])


def test_train_with_packed_documents(tmp_path):
    """--pack-documents trains on the same windows with file boundaries respected: another loss, finite."""
    import math

    from dilated_attention_pytorch.training import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):  # short files (every window crosses file boundaries); held out: every 20th, made long
        size = 40 if i % 20 == 19 else random.randint(5, 20)
        (corpus / f"f{i:02d}.txt").write_bytes(bytes(random.randrange(97, 123) for _ in range(size)))
    args = ["--steps", "2", "--batch-size", "2", "--context", "32", "--embed-dim", "16", "--layers", "1", "--heads",
            "2", "--segments", "8", "16", "--dilations", "1", "2", "--eval-every", "2", "--eval-windows", "2",
            "--sample-bytes", "0", "--no-progress", "--corpus", str(corpus)]
    packed = train.main(args + ["--pack-documents", "--out", str(tmp_path / "packed")])
    plain = train.main(args + ["--out", str(tmp_path / "plain")])
    assert math.isfinite(packed["final_train_bpb"]) and packed["final_train_bpb"] != plain["final_train_bpb"]
    saved = torch.load(tmp_path / "packed" / "checkpoint.pt", weights_only=True)["args"]
    assert saved["pack_documents"] is True
