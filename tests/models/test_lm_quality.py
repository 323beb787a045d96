"""benchmarks/lm_quality.py on the CPU at tiny sizes: every attention kind trains, the JSON holds finite
held-out losses (at equal steps, equal time, by position bucket) and the two plots are written."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lm_quality.py"


def _load():
    spec = importlib.util.spec_from_file_location("lm_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lmq():
    return _load()


def test_smoke_run_writes_json_plots_and_table(lmq, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "lmq.json"
    result = lmq.main(["--smoke", "--json", str(out), "--img-dir", str(tmp_path)])
    saved = json.loads(out.read_text())
    assert saved["comparison"] == json.loads(json.dumps(result["comparison"]))
    assert [r["kind"] for r in saved["runs"]] == list(lmq.KINDS)
    steps = lmq.SMOKE["steps"]
    for r in saved["runs"]:
        assert r["steps"] == steps and r["tokens_per_s"] > 0
        assert [h["step"] for h in r["val_history"]] == [0, 2, 4]
        assert all(math.isfinite(h["bpb"]) and 0 < h["bpb"] < 10 for h in r["val_history"])
        assert r["final_bpb"] == r["val_history"][-1]["bpb"]
        assert list(r["positions"]["buckets"]) == ["0-8", "8-32", "32-64"]
        assert all(math.isfinite(v) for v in r["positions"]["buckets"].values())
        assert all(math.isfinite(bpb) and 1 <= pos <= 64 for pos, bpb in r["positions"]["curve"])
        assert r["val_history"][0]["train_bpb"] is None
        assert all(math.isfinite(h["train_bpb"]) for h in r["val_history"][1:])
    # Same seed: the same weights and parameter count for every kind, and learning happens.
    assert len({r["parameters"] for r in saved["runs"]}) == 1
    assert all(r["final_bpb"] < r["val_history"][0]["bpb"] for r in saved["runs"])
    cmp = saved["comparison"]
    assert cmp["equal_step"] == steps
    for kind, c in cmp["by_kind"].items():
        run = next(r for r in saved["runs"] if r["kind"] == kind)
        assert c["bpb_at_equal_step"] == run["final_bpb"]
        assert math.isfinite(c["bpb_at_equal_seconds"]) and math.isfinite(c["bpb_drop_last_quarter"])
    assert (tmp_path / "lm_quality_smoke_time.png").stat().st_size > 0
    assert (tmp_path / "lm_quality_smoke_position.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "| LongNet dilated | 16/1, 32/2, 64/4 | 4 |" in table
    assert lmq.markdown_table(saved).count("\n") == 1 + len(lmq.KINDS)


def test_patterns_of_each_kind(lmq):
    assert lmq.patterns("dense", 32768, 2048) == ((32768,), (1,))
    assert lmq.patterns("local", 32768, 2048) == ((2048,), (1,))
    assert lmq.patterns("dilated", 32768, 2048) == ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 8, 16))
    assert lmq.patterns("dilated", 8192, 2048) == ((2048, 4096, 8192), (1, 2, 4))


def test_dense_core_is_causal_attention(lmq):
    import torch

    q, k, v = (torch.randn(2, 24, 3, 8, dtype=torch.float64) for _ in range(3))  # (b, n, h, d)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v)
    torch.testing.assert_close(lmq.CausalSDPA()(q, k, v), expected)


def test_time_based_lr_schedule(lmq):
    cfg = lmq.QualityConfig(seconds=100.0, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lmq.lr_at(0, 0.0, cfg) == pytest.approx(1e-4)
    assert lmq.lr_at(10, 0.0, cfg) == pytest.approx(1e-3)
    assert lmq.lr_at(500, 50.0, cfg) == pytest.approx(0.55e-3)
    assert lmq.lr_at(900, 100.0, cfg) == pytest.approx(1e-4)


@pytest.mark.parametrize("changes, match", [
    (dict(context=6144), "power of two"),
    (dict(seconds=None, steps=None), "budget"),
    (dict(kinds=("dense", "sparse")), "kinds"),
    (dict(steps=0), "steps"),
])
def test_bad_config_is_a_clear_error(lmq, changes, match):
    with pytest.raises(ValueError, match=match):
        lmq.QualityConfig(**changes)
