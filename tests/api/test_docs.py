"""Every ```python block of README.md, docs/*.md and examples/*.md runs as written, each in a fresh
interpreter in an empty folder; blocks that start a process group run under 2 gloo ranks (torchrun).
A block that needs an optional package that is not installed is skipped, naming it."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = ["README.md"] + sorted(glob.glob("docs/*.md", root_dir=ROOT)) + sorted(glob.glob("examples/*.md", root_dir=ROOT))
OPTIONAL = ("transformers", "deepspeed", "matplotlib", "triton")


def _blocks() -> list[tuple[str, int, str]]:
    found = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
            found.append((doc, text.count("\n", 0, m.start()) + 1, m.group(1)))
    return found


BLOCKS = _blocks()


def test_the_docs_have_python_blocks():
    assert {doc for doc, _, _ in BLOCKS} >= {"README.md", "docs/block_sparse.md", "examples/DEEPSPEED.md"}


@pytest.mark.parametrize("doc,line,code", BLOCKS, ids=[f"{d}:{n}" for d, n, _ in BLOCKS])
def test_block_runs(doc, line, code, tmp_path):
    for pkg in OPTIONAL:
        if re.search(rf"^\s*(import|from) {pkg}\b", code, flags=re.M) and importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{doc}:{line} needs {pkg}, which is not installed")
    script = tmp_path / "block.py"
    script.write_text(code)
    distributed = "init_process_group" in code or "init_distributed" in code
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)] \
        if distributed else [sys.executable, str(script)]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{doc}:{line} failed:\n{code}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
