"""benchmarks/decode_bench.py --smoke runs on CPU (the CUDA-graph methods eagerly) and writes its table and plot;
the bounded caches' bytes do not grow with the context while SDPA's full cache does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_bench.py"


def test_decode_bench_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("decode_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "decode_bench.json").read_text())["rows"]
    assert (tmp_path / "decode_bench.png").stat().st_size > 0
    for batch in (1, 2):
        dil = [r["cache_bytes"] for r in rows if r["method"] == "dilated" and r["batch"] == batch]
        sdpa = [r["cache_bytes"] for r in rows if r["method"] == "sdpa" and r["batch"] == batch]
        assert dil[0] == dil[1] > 0 and sdpa[1] == 4 * sdpa[0]  # contexts 512 and 2048
        static = [r["cache_bytes"] for r in rows if r["method"] == "dilated-graph" and r["batch"] == batch]
        assert static[0] == static[1] > 0  # the fixed-shape cache: lanes of one segment, not the context
        assert all(r["tokens_per_s"] > 0 for r in rows)
    assert {r["method"] for r in rows} == {"dilated", "sdpa", "dilated-graph", "sdpa-graph"}
    assert not any(r["graph"] for r in rows)  # no CUDA: the graph methods ran eagerly
