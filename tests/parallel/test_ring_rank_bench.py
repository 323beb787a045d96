"""benchmarks/ring_rank_bench.py on the CPU at tiny sizes: one simulated rank, run through the ring's own
code with the in-process exchange, gives that rank's shard of single-device ``dilated_attention`` on the
whole sequence (forward and dQ); per-rank attended pairs add up to the whole sequence's; the smoke run
writes a JSON with every field the report needs."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from dilated_attention_pytorch import dilated_attention
from dilated_attention_pytorch.bench.flops import attended_pairs

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ring_rank_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ring_rank_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ring_rank_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["ring_rank_bench"]


def _args(bench, **kw):
    a = bench.build_parser().parse_args(["--out", "unused", "--smoke"])
    a.base, a.heads, a.kv_heads, a.head_dim, a.dtype, a.device = 4, 4, 2, 8, "float64", "cpu"
    vars(a).update(kw)
    return a


@pytest.mark.parametrize("regime", ["longnet", "straddling"])
def test_simulated_rank_equals_its_shard(bench, regime):
    rnd = random.Random(int(torch.randint(0, 2**31, ()).item()))  # fresh configuration every run
    world, causal, seed = rnd.choice([2, 3, 5]), rnd.random() < 0.5, rnd.randint(0, 1000)
    s = bench.setting(regime, world, rnd.choice([20, 26, 33]), causal, _args(bench))
    whole = [torch.cat([bench.shard(s, p, i, seed) for p in range(world)], 1).requires_grad_(i < 3)
             for i in range(4)]
    out = dilated_attention(*whole[:3], list(s.segs), list(s.dils), is_causal=causal)
    out.backward(whole[3])
    total = 0
    for p in range(world):
        call, (q, _, _, _) = bench.rank_call(s, p, seed, backward=True)
        sl = slice(p * s.n_local, (p + 1) * s.n_local)
        torch.testing.assert_close(call(), out[:, sl], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(q.grad, whole[0].grad[:, sl], rtol=1e-10, atol=1e-10)
        total += sum(v[0] for v in bench.rank_pairs(s, p).values())
    assert total == attended_pairs(s.n, s.heads, s.segs, s.dils, is_causal=causal)
    assert not s.plan(0).local_only  # segments cross shard boundaries: the exchange is used


def test_smoke_run_writes_the_report(bench, tmp_path):
    out = tmp_path / "ring_rank.json"
    bench.main(["--smoke", "--out", str(out), "--world", "2", "3", "--regimes", "longnet", "aligned"])
    report = json.loads(out.read_text())
    results = report["results"]
    assert {(r["regime"], r["causal"], r["world"]) for r in results} == {
        (g, c, w) for g in ("longnet", "aligned") for c in (False, True) for w in (2, 3)}
    for r in results:
        assert r["ranks"][0]["rank"] == 0 and r["ranks"][-1]["rank"] == r["world"] - 1
        for row in r["ranks"]:
            assert row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0 and row["fwdbwd_tflops"] > 0
            assert row["fwd_ceiling_tflops"] > 0
            receives = r["regime"] == "longnet" and (row["rank"] > 0 or not r["causal"])  # causal: from earlier ranks
            assert (row["bytes_received"] > 0) == receives, (r, row)
        assert r["fwdbwd"]["single_device_ms_over_P"] > 0  # whole sequences this short run on one device
    assert all(r["segments"][-1] >= r["n_total"] for r in results if r["regime"] == "longnet")
