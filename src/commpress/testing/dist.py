"""A persistent world of gloo processes for multi-process tests.

Spawning processes and importing torch costs seconds per world; a test suite
that compares dozens of collectives with plain ``torch.distributed`` would
spend most of its time there. `DistPool` starts ``world_size`` processes
once, initializes a gloo process group in each, and then runs one function
after another on all ranks::

    def body(rank, world_size, n):
        import torch, torch.distributed as dist
        t = torch.full((n,), float(rank))
        dist.all_reduce(t)
        return t

    with DistPool(2) as pool:
        results = pool.run(body, 4)   # [rank0 result, rank1 result]

``body`` must be importable by the workers (a module-level function of an
importable module, e.g. a test module). Its return values travel back by
pickle. An exception on any rank is re-raised in the caller as
`RemoteError` with every failing rank's traceback; the pool then restarts
its workers (a rank that failed half-way may have left the process group
in a state no later job should inherit). A rank that dies (``os._exit``)
is reported as `RankDied` in the results when ``allow_death=True``.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DistPool", "RemoteError", "RankDied", "free_port"]


@dataclass(frozen=True)
class RankDied:
    """Placeholder result for a rank whose process exited during the job."""

    rank: int
    exitcode: int | None


@dataclass(frozen=True)
class RemoteFailure:
    """An exception raised on one rank, as text (exception objects may not pickle)."""

    rank: int
    type_name: str
    message: str
    traceback: str


class RemoteError(AssertionError):
    """One or more ranks raised; ``failures`` holds each rank's `RemoteFailure`."""

    def __init__(self, failures: list[RemoteFailure]) -> None:
        self.failures = failures
        text = "\n".join(
            f"--- rank {f.rank}: {f.type_name}: {f.message}\n{f.traceback}" for f in failures
        )
        super().__init__(f"{len(failures)} rank(s) raised:\n{text}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, pg_timeout: float, tasks: Any, results: Any
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        job, fn, args, kwargs = task
        try:
            value = fn(rank, world_size, *args, **kwargs)
            results.put((job, rank, True, value))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
            failure = RemoteFailure(rank, type(exc).__name__, str(exc), traceback.format_exc())
            results.put((job, rank, False, failure))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - shutting down anyway
        pass
    # Every answer was collected before the stop task came; skip the interpreter's
    # finalization (about 1 s of torch's teardown per worker here, which ``close``
    # waited for, at every pool of a test session).
    results.close()
    results.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class DistPool:
    """``world_size`` long-lived gloo ranks that run jobs on demand.

    Args:
        world_size: number of ranks (processes).
        pg_timeout: seconds the default process group waits in a collective before
            it raises (a hung job fails instead of hanging the test suite).
        job_timeout: default seconds ``run`` waits for all ranks.
        env: extra environment variables for the workers (set before they start).
        failure_grace: seconds to wait for the other ranks once one rank has raised.
    """

    def __init__(
        self,
        world_size: int,
        pg_timeout: float = 60.0,
        job_timeout: float = 120.0,
        env: dict[str, str] | None = None,
        failure_grace: float = 5.0,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.pg_timeout = pg_timeout
        self.job_timeout = job_timeout
        self.env = dict(env or {})
        self.failure_grace = failure_grace
        self._job = 0
        self._procs: list[Any] = []
        self._start()

    def _start(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = free_port()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            self._procs = [
                ctx.Process(
                    target=_worker,
                    args=(r, self.world_size, port, self.pg_timeout, self._tasks[r], self._results),
                    daemon=True,
                )
                for r in range(self.world_size)
            ]
            for p in self._procs:
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def restart(self) -> None:
        """Kill every worker and start a fresh world (new port, new process group)."""
        self._stop(graceful=False)
        self._start()

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float | None = None,
        allow_death: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``fn(rank, world_size, *args, **kwargs)`` on every rank; return results by rank.

        Raises:
            RemoteError: any rank raised (after every rank reported or died).
            TimeoutError: not every rank answered within ``timeout`` seconds; the pool
                is restarted.
        """
        self._job += 1
        job = self._job
        for q in self._tasks:
            q.put((job, fn, args, kwargs))
        results: dict[int, Any] = {}
        failures: list[RemoteFailure] = []
        deadline = time.monotonic() + (timeout or self.job_timeout)
        while len(results) + len(failures) < self.world_size:
            try:
                got_job, rank, ok, value = self._results.get(timeout=0.2)
            except queue.Empty:
                answered = set(results) | {f.rank for f in failures}
                dead = [
                    r for r, p in enumerate(self._procs) if r not in answered and not p.is_alive()
                ]
                for r in dead:
                    results[r] = RankDied(r, self._procs[r].exitcode)
                if time.monotonic() > deadline:
                    self.restart()
                    if failures:  # the others are stuck waiting for the rank that raised
                        raise RemoteError(sorted(failures, key=lambda f: f.rank)) from None
                    raise TimeoutError(
                        f"{fn.__name__} did not finish on every rank within "
                        f"{timeout or self.job_timeout}s (answered: {sorted(answered)})"
                    ) from None
                continue
            if got_job != job:
                continue  # a late answer from a job that already failed
            if ok:
                results[rank] = value
            else:
                failures.append(value)
                # Ranks still inside a collective with the failed one would wait for the
                # process-group timeout; give them a short grace period instead.
                deadline = min(deadline, time.monotonic() + self.failure_grace)
        died = any(isinstance(v, RankDied) for v in results.values())
        if failures or died:
            self.restart()
        if failures:
            raise RemoteError(sorted(failures, key=lambda f: f.rank))
        if died and not allow_death:
            raise RemoteError(
                [
                    RemoteFailure(r, "RankDied", f"exit code {v.exitcode}", "")
                    for r, v in results.items()
                    if isinstance(v, RankDied)
                ]
            )
        return [results[r] for r in range(self.world_size)]

    def _stop(self, graceful: bool) -> None:
        if graceful:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=5)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []

    def close(self) -> None:
        """Stop the workers (gracefully, then by force)."""
        if self._procs:
            self._stop(graceful=True)

    def __enter__(self) -> DistPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
