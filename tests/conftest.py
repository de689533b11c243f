"""Shared test fixtures."""

import os
from pathlib import Path

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


TESTS_DIR = Path(__file__).resolve().parent
CELEBA_LIKE = TESTS_DIR / "data" / "celeba-like"  # small generated JPEGs kept in the repository (make_celeba_like.py)


def shared_data(relative: str) -> Path:
    """A folder of the developers' shared, read-only data (e.g. the real CelebA sample), or a skip saying why.

    Looked for in $ARELBO_SHARED_DATA, then ../shared/data beside the checkout. Under CI=true its absence is a
    failure, not a skip: CI must never pass by silently testing less.
    """
    roots = [Path(p) for p in [os.environ.get("ARELBO_SHARED_DATA")] if p]
    roots += [TESTS_DIR.parent / "shared" / "data", TESTS_DIR.parents[1] / "shared" / "data",
              Path("/work/shared/data")]
    for root in roots:
        if (root / relative).exists():
            return root / relative
    message = f"shared data {relative} not found in {', '.join(map(str, roots))}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (required under CI=true)")
    pytest.skip(message)
