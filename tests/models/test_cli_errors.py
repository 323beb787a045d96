"""Every command: a mistake on the command line is one line on stderr and exit status 2 (no traceback);
help lists every command, and every option has help text and a default shown."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from dilated_attention_pytorch import __main__ as cli
from dilated_attention_pytorch.bench import cli as bench_cli
from dilated_attention_pytorch.info import EXTRAS
from dilated_attention_pytorch.training import generate, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_TRAIN = ["--embed-dim", "16", "--heads", "2", "--layers", "1", "--context", "16", "--batch-size", "2",
              "--segments", "4", "8", "--dilations", "1", "2", "--eval-windows", "2", "--sample-bytes", "0"]

ERRORS = [  # (argv, text the one line must contain)
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["demo", "--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    (["demo", "--seq", "0"], "argument --seq: must be an integer >= 1, but got '0'"),
    (["demo", "--device", "gpu0"], "argument --device: 'gpu0' is not a device"),
    (["demo", "--segments", "8", "16", "--dilations", "1"], "segment_lengths and dilation_rates must have the same"),
    (["demo", "--segments", "4", "--dilations", "8"], "dilation_rates[0] must be <= segment_lengths[0]"),
    (["train", "--steps", "0"], "argument --steps: must be an integer >= 1, but got '0'"),
    (["train", "--steps", "3", "--stop-after", "5"], "--stop-after must be in [1, --steps=3], but got 5"),
    (["train", "--heads", "3", "--kv-heads", "2"], "--heads (3) must be a multiple of --kv-heads (2)"),
    (["train", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["train", "--attention-type", "ring"], "argument --attention-type: invalid choice: 'ring'"),
    (["train", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["generate", "missing-folder"], "does not exist; give the path train printed"),
    (["generate", "--stop", "\n\n"], "--stop must be one byte"),
    (["generate", "--top-p", "2"], "top_p must be None or a number in (0, 1]"),
    (["generate", "--prompt", ""], "--prompt must not be empty"),
    (["bench", "--methods", "nothing"], "argument --methods: invalid choice: 'nothing'"),
    (["bench", "--heads", "6", "--kv-heads", "4"], "--heads (6) must be a multiple of --kv-heads (4)"),
    (["info", "--verbose"], "unrecognized arguments: --verbose"),
]
if not torch.cuda.is_available():
    ERRORS += [
        (["demo", "--device", "cuda"], "argument --device: 'cuda':"),
        (["train", "--device", "cuda:0"], "argument --device: 'cuda:0':"),
        (["bench", "--methods", "fused"], "--methods fused needs a CUDA GPU"),
    ]


@pytest.mark.parametrize("argv,message", ERRORS, ids=[" ".join(a) or "(none)" for a, _ in ERRORS])
def test_a_command_line_mistake_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a command might write lands in the repository
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("python -m dilated_attention_pytorch") and ": error: " in lines[0]
    assert message in lines[0]
    assert not os.listdir(tmp_path), os.listdir(tmp_path)  # and nothing was written


def test_a_subprocess_gets_no_traceback():
    """The real entry point, as a user runs it (another folder, a bad option)."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    res = subprocess.run([sys.executable, "-m", "dilated_attention_pytorch", "demo", "--dtype", "fp16"],
                         capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "invalid choice: 'fp16'" in res.stderr


def test_top_level_help_lists_and_describes_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, (_, summary) in cli.COMMANDS.items():
        assert f"  {name}" in out and summary.split()[0] in out


def _parsers() -> dict[str, argparse.ArgumentParser]:
    return {name: importlib.import_module(module).build_parser() for name, (module, _) in cli.COMMANDS.items()}


def test_every_option_has_help_and_shows_its_default(capsys):
    for name, parser in _parsers().items():
        text = parser.format_help()
        assert "``" not in text and ":mod:" not in text, name  # no reStructuredText in the help
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            shown = parser.formatter_class(parser.prog)._get_help_string(action)
            assert "(default: %(default)s)" in shown, (name, action.dest)  # the formatter adds the default


def test_train_prints_its_folder_first_and_a_line_per_evaluation_and_stop_examples_work(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(TINY_TRAIN + ["--steps", "4", "--eval-every", "2", "--out", str(out), "--no-progress"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"output folder: {out.resolve()}"
    evals = [line for line in lines if line.startswith("step ")]
    assert [line.split(":")[0] for line in evals] == ["step 2/4", "step 4/4"]
    assert all("held-out" in line and "bits/byte" in line for line in evals)
    assert lines[-1] == f"wrote checkpoint.pt, loss.png and metrics.json in {out.resolve()}"
    for stop in ("\\n", "\n", "e"):  # --stop's help examples: '\n' typed in a shell, and $'\n'
        texts = generate.main([str(out), "--max-new-bytes", "8", "--stop", stop])
        assert len(texts) == 1


def test_bench_header_legend_absolute_paths_and_no_overwrite(tmp_path, capsys):
    argv = ["--seq-lens", "64", "128", "--heads", "2", "--head-dim", "8", "--segments", "16", "32",
            "--dilations", "1", "2", "--dense-max", "64", "--warmup", "1", "--repeats", "2", "--modes", "fwd",
            "--out", str(tmp_path), "--name", "run", "--no-progress"]
    monkey = {"MIN_WARMUP_S": bench_cli.MIN_WARMUP_S, "MIN_TIME_S": bench_cli.MIN_TIME_S}
    bench_cli.MIN_WARMUP_S = bench_cli.MIN_TIME_S = 0.0
    try:
        first = bench_cli.main(argv)
        second = bench_cli.main(argv)
    finally:
        bench_cli.MIN_WARMUP_S, bench_cli.MIN_TIME_S = monkey["MIN_WARMUP_S"], monkey["MIN_TIME_S"]
    out = capsys.readouterr().out
    assert out.startswith("bench: dilated attention vs dense attention on ")
    assert "heads 2 (key/value heads 2), head_dim 8" in out and "16/1, 32/2" in out
    for header, _, _, _ in bench_cli.COLUMNS:
        assert f"\n  {header} " in out  # a legend line for every column
    assert [p.name for p in first] == ["run.json", "run.csv", "run.png", "run-time.png"]
    assert [p.name for p in second] == ["run-2.json", "run-2.csv", "run-2.png", "run-2-time.png"]
    for path in first + second:
        assert path.is_absolute() and str(path) in out and path.stat().st_size > 0
    rows = json.loads(first[0].read_text())["rows"]
    dense = {r["seq_len"]: r for r in rows if r["method"] == "dense"}
    assert dense[64]["ms"] > 0 and dense[128]["ms"] is None
    assert dense[128]["dense_estimate_ms"] == pytest.approx(dense[64]["ms"] * 4)  # ∝ n², past --dense-max
    portable = [r for r in rows if r["method"] == "portable"]
    assert all(r["spread_pct"] is not None and r["calls"] >= 2 for r in portable)
    assert portable[0]["vs_dense"] == pytest.approx(dense[64]["ms"] / portable[0]["ms"])


def test_info_names_every_extra_of_pyproject():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        extras = tomllib.load(fh)["project"]["optional-dependencies"]
    assert set(EXTRAS) == set(extras)
    for extra, requirements in extras.items():
        names = {r.split(">")[0].split("=")[0].split("<")[0].strip().replace("-", "_") for r in requirements}
        assert names == set(EXTRAS[extra][0]), extra
