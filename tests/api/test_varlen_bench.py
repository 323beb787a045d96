"""benchmarks/varlen_bench.py --smoke on the CPU: every method is timed in both modes, the JSON holds the
document lengths (log-uniform, summing to the total) and finite positive timings and ratios."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "varlen_bench.py"


def load():
    spec = importlib.util.spec_from_file_location("varlen_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_table_and_json(tmp_path, capsys):
    bench = load()
    out = tmp_path / "varlen.json"
    bench.main(["--smoke", "--out", str(out), "--seed", "7"])
    printed = capsys.readouterr().out
    assert "packed × ceiling / unpacked × ceiling" in printed
    result = json.loads(out.read_text())
    assert sum(result["lengths"]) == result["config"]["total"]
    methods = {(r["mode"], r["method"]) for r in result["rows"]}
    assert methods == {(m, x) for m in ("fwd", "fwdbwd")
                       for x in ("packed", "packed ceiling", "unpacked", "unpacked ceiling")}
    for r in result["rows"]:
        assert r["ms"] > 0 and math.isfinite(r["tflops"]) and r["tflops"] > 0
        if not r["method"].endswith("ceiling"):
            assert r["vs_ceiling"] > 0


def test_document_lengths_and_ceiling_shapes():
    bench = load()
    import random

    lengths = bench.document_lengths(10000, 100, 4000, random.Random())
    assert sum(lengths) == 10000 and max(lengths) <= 4000 and min(lengths[:-1]) >= 100
    shapes = bench.ceiling_shapes([5, 20], (8, 16), (1, 2))
    # doc 5: W = 5 -> one sequence of 5, one of 3; doc 20: W = 8 -> 3 of 8, W = 16 -> 2 of 8
    assert shapes == {5: 1, 3: 1, 8: 5}
