"""Shared fixtures: persistent gloo worlds of 2 and 3 ranks for the whole test session.

Starting a world costs seconds; tests share these and batch many cases into one
``pool.run``. A job that raises (or a rank that dies) makes the pool restart its
workers, so test bodies catch expected errors themselves and return them.

Every process of the session (pool workers, torchrun ranks, subprocesses) shares one
codec-speed cache of ``auto``'s calibration, in a temporary directory removed at the
end (never the user's ``~/.cache``): codec speeds are measured once per session
(about 2.6 s on 2 ranks), not once per test. Tests of the cache itself set their own.

The tests on emulated hosts (real torchrun across network namespaces) share one job
per layout (`emulated_hosts`): a job's start-up, a torchrun agent and a rank process
per rank, each importing torch, costs more than most of what the tests then measure.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from commpress.bench import multihost
from commpress.calibration import CACHE_ENV
from commpress.testing import DistPool

HERE = os.path.dirname(os.path.abspath(__file__))
_HIER = (
    "commpress.bench.multihost:measure_all_reduce",
    {"mib": 16, "configs": ["hier-int8"], "iters": 2},
)
_MOE = ("test_moe_internode:measure_cross_bytes", {})
#: What runs on each emulated-host layout, in one job, in this order: name -> (function,
#: kwargs); every rank's results reach the test that asks by name (`EmulatedHosts.ranks`).
EMULATED = {
    (2, 2): {
        "hierarchical": _HIER,
        "moves": ("test_hierarchical_moves:measure_moves", {"mib": 8}),
        "moe": _MOE,
        "auto": ("test_auto_levels:_emulated_body", {}),
    },
    (3, 1): {"hierarchical": _HIER, "moe": _MOE},
}


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


@pytest.fixture(scope="session")
def gloo4():
    """4 ranks: the two-level tests (2 emulated hosts of 2 ranks, or 4 on one host)."""
    with DistPool(4, pg_timeout=60, job_timeout=200) as pool:
        yield pool


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def gloo(request):
    """The 2-rank and the 3-rank world in turn (odd sizes catch chunking bugs)."""
    return request.getfixturevalue(f"gloo{request.param}")


class EmulatedHosts:
    """Runs each layout's functions of `EMULATED` in one job (1 Gbit/s links) on first use."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[int, int], dict | BaseException] = {}

    def ranks(self, hosts: int, local: int, name: str) -> list:
        """Every rank's value of ``name`` on the ``hosts x local`` layout, by global rank."""
        ok, why = multihost.available()
        if not ok:
            pytest.skip(f"no multi-host emulation here: {why}")
        key = (hosts, local)
        if key not in self._jobs:
            try:
                self._jobs[key] = multihost.run_functions(
                    hosts, local, EMULATED[key], rate="1gbit", timeout=480, pythonpath=[HERE]
                )["ranks"]
            except Exception as exc:  # every test of the layout reports the job's failure
                self._jobs[key] = exc
        job = self._jobs[key]
        if isinstance(job, BaseException):
            raise RuntimeError(f"the {hosts}x{local} emulated-host job failed: {job}") from job
        return job[name]


@pytest.fixture(scope="session")
def emulated_hosts():
    return EmulatedHosts()
