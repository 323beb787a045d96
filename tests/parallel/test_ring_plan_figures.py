"""benchmarks/ring_plan_figures.py at a small scale (n_local 4096, base 16, up to 128 ranks): on the
LongNet schedule the bytes a rank sends and its peak receive buffers stay within a constant per
pattern crossing its shard (each pattern moves at most ``base`` rows per head each way), so they grow
with the number of patterns, not with N; a rank's received bytes mirror what the others send it."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from dilated_attention_pytorch.parallel.ring_plan import ring_plan

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ring_plan_figures.py"


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("ring_plan_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bytes_per_rank_flat_per_pattern(figures, tmp_path):
    base, heads, d, itemsize, n_local = 16, 4, 8, 2, 4096
    out = tmp_path / "figures.json"
    worlds = [2, 4, 8, 16, 32, 64, 128]
    figures.main(["--out", str(out), "--world", *map(str, worlds), "--n-local", str(n_local), "--base", str(base),
                  "--heads", str(heads), "--head-dim", str(d), "--itemsize", str(itemsize)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["world"], r["causal"]) for r in rows] == [(w, c) for c in (False, True) for w in worlds]
    one_way = base * heads * 2 * d * itemsize  # base rows of keys and values, every head
    for r in rows:
        segs, _ = figures.longnet_schedule(base, r["n_total"])
        crossing = sum(w > n_local for w in segs)  # n_local is a multiple of the shorter segments
        assert 1 <= r["max_spanning"] <= crossing, r
        assert 0 < r["max_sent"] <= 2 * one_way * r["max_spanning"], r  # forward + backward
        assert 0 < r["max_peak_recv"] <= 4 * one_way * r["max_spanning"], r
    for causal in (False, True):
        sent = [r["max_sent"] for r in rows if r["causal"] == causal]
        assert sent[-1] < sent[0] * worlds[-1] / worlds[0] / 4  # N grows 64x, the bytes far less


def test_received_bytes_mirror_sent(figures):
    rnd = random.Random(int(torch.randint(0, 2**31, ()).item()))  # fresh configuration every run
    world, n_local, base = rnd.choice([3, 5, 8]), rnd.randint(5, 40), rnd.choice([2, 3, 4])
    segs, dils = figures.longnet_schedule(base, world * n_local)
    causal, heads, d = rnd.random() < 0.5, rnd.choice([2, 4]), 8
    plans = [ring_plan(world, r, n_local, heads, heads, segs, dils, "paper", False, causal) for r in range(world)]
    for p, plan in enumerate(plans):  # what p receives from q is what q sends to p
        for q, ts in plan.recvs:
            assert dict(plans[q].sends)[p] == ts
    assert sum(p.forward_bytes_received(1, d, 2) for p in plans) == sum(p.forward_bytes_sent(1, d, 2) for p in plans)
    assert sum(p.forward_bytes_received(1, d, 2) for p in plans) > 0
