"""GPU-only tests (marked ``cuda``): ``python -m pytest -m cuda`` on a GPU machine runs them all; on a
machine without CUDA they are skipped (tests/conftest.py)."""
