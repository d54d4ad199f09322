"""Shared fixtures."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # parallel workers (scripts/test.sh): share the cores out
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to a busy machine (OpenMP waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
