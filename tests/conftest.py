"""Shared fixtures: persistent gloo worlds of 2 and 3 ranks for the whole test session.

Starting a world costs seconds; tests share these and batch many cases into one
``pool.run``. A job that raises (or a rank that dies) makes the pool restart its
workers, so test bodies catch expected errors themselves and return them.

Every process of the session (pool workers, torchrun ranks, subprocesses) shares one
codec-speed cache of ``auto``'s calibration, in a temporary directory removed at the
end (never the user's ``~/.cache``): codec speeds are measured once per session
(about 2.6 s on 2 ranks), not once per test. Tests of the cache itself set their own.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from commpress.calibration import CACHE_ENV
from commpress.testing import DistPool


def pytest_configure(config):
    if not os.environ.get(CACHE_ENV):
        root = tempfile.mkdtemp(prefix="commpress-test-cache-")
        os.environ[CACHE_ENV] = root
        config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))


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
