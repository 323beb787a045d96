"""Fixtures and hooks only (shared helpers are in ``tests.helpers``)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.tensors import DEVICES

# Without a GPU, Triton kernels run in Triton's interpreter on the CPU (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (everything under tests/cuda/) are skipped where CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def fresh_dynamo():
    """A clean torch.compile cache before and after the test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
