"""Shared fixtures: persistent gloo worlds of 2 and 3 ranks for the whole test session.

Starting a world costs seconds; tests share these and batch many cases into one
``pool.run``. A job that raises (or a rank that dies) makes the pool restart its
workers, so test bodies catch expected errors themselves and return them.
"""

from __future__ import annotations

import pytest

from commpress.testing import DistPool


@pytest.fixture(scope="session")
def gloo2():
    with DistPool(2, pg_timeout=60, job_timeout=180) as pool:
        yield pool


@pytest.fixture(scope="session")
def gloo3():
    with DistPool(3, pg_timeout=60, job_timeout=180) as pool:
        yield pool


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def gloo(request):
    """The 2-rank and the 3-rank world in turn (odd sizes catch chunking bugs)."""
    return request.getfixturevalue(f"gloo{request.param}")
