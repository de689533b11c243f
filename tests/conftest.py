"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one intra-op thread (torch and BLAS): the tests use tiny tensors, for which extra
    threads on a shared 2-core machine only add contention (a 10x slowdown measured). Restores the settings."""
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(previous)
