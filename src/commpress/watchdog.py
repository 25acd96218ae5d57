"""Ranks in different calls: told apart through the rendezvous store, not left to hang.

When two ranks of a group are in different collectives -- one compresses an
all-reduce (a descriptor exchange, then payload all-gathers), the other makes
a plain one (``codec="none"``, a smaller ``min_bytes``, ``bf16`` against
``none``) -- the backend waits for messages that never come, until the
process group's timeout (30 minutes by default). No collective can ask what
the peers are doing (that is what is stuck); the store every process group
is built on can, the way torch's flight recorder compares call logs.

How it works:

- Every call that goes through `commpress.distributed.call.execute` (plain
  or compressed; send/recv are not collective and do not) takes the next
  number of its group and a description: op, ``plain`` or the codec, dtype
  (`begin`; the element count is shown, not compared, since ``all_to_all``
  inputs may differ). The last `LOG_LENGTH` stay in this process. Nothing is
  sent.
- A backend wait on CPU goes through `wait`, which waits in slices of
  `interval_s` (``COMMPRESS_WATCHDOG_S``, default 5 s; 0 turns the watchdog
  off). Each time a slice runs out, the rank writes its log and the number
  of the call it is blocked in to ``commpress/calls/<n>/<group>/<rank>`` in
  the default group's store, and reads its peers' records.
- It raises `CollectiveError` on evidence only: a call number that the two
  logs describe differently (in a correct program every rank makes the same
  calls in the same order). The message names the call, the ranks and what
  each called. Every rank blocked in a commpress call checks the same way,
  so all of them raise within about two slices (10 s by default) of each
  other's first record.
- A peer with no record, or blocked in an earlier call (it computes, or it
  is in a call commpress does not see, e.g. an unpatched
  ``torch.distributed`` call), is not an error: a long evaluation on rank 0
  while the others wait is a normal program. After `WARN_AFTER_S` the rank
  warns once, naming those peers and where they were last blocked.

Before raising, the rank aborts the group's backend (``ProcessGroup.abort``):
the stuck backend work would otherwise keep the process from exiting until
the timeout. The group cannot be used again: destroy it. CUDA (NCCL)
waits are not sliced: NCCL's own watchdog and flight recorder cover them.
"""

from __future__ import annotations

import collections
import ctypes
import datetime
import json
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import CollectiveError
from .units import env_seconds

__all__ = [
    "DEFAULT_INTERVAL_S",
    "ENV_INTERVAL",
    "LOG_LENGTH",
    "WARN_AFTER_S",
    "Entry",
    "begin",
    "explain",
    "interval_s",
    "running",
    "wait",
]

ENV_INTERVAL = "COMMPRESS_WATCHDOG_S"
DEFAULT_INTERVAL_S = 5.0
#: Seconds blocked before a rank warns that some peers recorded nothing.
WARN_AFTER_S = 60.0
_PREFIX = "commpress/calls/"
#: gloo's message when ``Work.wait(timeout)`` runs out (the work goes on).
_SLICE_EXPIRED = "Operation timed out"


@dataclass(frozen=True)
class Entry:
    """One call on one group: its sequence number there and what it is.

    ``what`` (op, ``plain`` or the codec, dtype) must match on every rank; ``shape``
    need not (``all_to_all`` inputs may differ in size) and only appears in messages.
    """

    group: str
    seq: int
    what: str
    shape: str

    def show(self) -> str:
        return f"#{self.seq} {self.what}{self.shape}"


#: Calls each group's log keeps (what a blocked rank publishes).
LOG_LENGTH = 32

_lock = threading.Lock()
_logs: dict[str, collections.deque[Entry]] = {}
_world: list[Any] = [None, 0]  # the default group the logs belong to, its incarnation
_local = threading.local()
_found: dict[tuple[str, int], str] = {}  # (group, call number) -> the divergence found


def interval_s(environ: Any = None) -> float:
    """The wait slice in seconds (``COMMPRESS_WATCHDOG_S``; 0: the watchdog is off).

    Raises:
        ConfigError: the variable is not a number >= 0.
    """
    return env_seconds(ENV_INTERVAL, DEFAULT_INTERVAL_S, "0 turns the watchdog off", environ)


def begin(group: str, op: str, codec: str | None, tensor: torch.Tensor) -> Entry:
    """Number a call on ``group`` (in the caller's issue order) and log it."""
    kind = "plain" if codec is None else codec
    dtype = str(tensor.dtype).removeprefix("torch.")
    with _lock:
        log = _log_locked(group)
        entry = Entry(
            group, log[-1].seq + 1 if log else 1, f"{op} {kind} {dtype}", f"[{tensor.numel()}]"
        )
        log.append(entry)
        return entry


def _log_locked(group: str) -> collections.deque[Entry]:
    world = dist.group.WORLD
    if _world[0] is not world:  # a new default group: numbering starts again
        _world[0], _world[1] = world, _world[1] + 1
        _logs.clear()
    log = _logs.get(group)
    if log is None:
        log = _logs[group] = collections.deque(maxlen=LOG_LENGTH)
    return log


@contextmanager
def running(entry: Entry) -> Iterator[None]:
    """Mark ``entry`` as the call this thread's backend waits belong to."""
    previous = getattr(_local, "entry", None)
    _local.entry = entry
    try:
        yield
    finally:
        _local.entry = previous


def wait(work: Any, device: torch.device | None = None, entry: Entry | None = None) -> None:
    """``work.wait()``, in slices that compare the ranks' calls (module docstring).

    Args:
        work: a backend ``Work`` (None: nothing to wait for).
        device: the call's device; only CPU waits are sliced.
        entry: the call the wait belongs to (default: the one `running` marked).

    Not for sends and receives: gloo fails those when a timed wait runs out, and
    they have neither a future nor a completion flag that moves before ``wait``.
    """
    if work is None:
        return
    if entry is None:
        entry = getattr(_local, "entry", None)
    step = interval_s()
    if entry is None or step == 0 or (device is not None and device.type != "cpu"):
        work.wait()
        return
    slice_ = datetime.timedelta(seconds=step)
    watch: _Watch | None = None  # made at the first slice that runs out: most never do
    while True:
        try:
            work.wait(timeout=slice_)
            return
        except RuntimeError as exc:
            if _SLICE_EXPIRED not in str(exc):
                found = _explained(entry)
                if found is None:
                    raise
                raise found from exc
        watch = watch or _Watch(entry)
        watch.check()


def _explained(entry: Entry) -> CollectiveError | None:
    """For a backend error of ``entry``'s call: the divergence behind it, if this rank
    or a peer found one (a peer that raised and left closes its connections)."""
    watch = _Watch(entry)
    reported = explain(entry) or watch.reported()
    return None if reported is None else watch.fail(reported)


def explain(entry: Entry) -> str | None:
    """What a check found about ``entry``'s call, if the ranks diverged there.

    A backend error of the call (a peer that raised and left closes its connections)
    is better reported with this.
    """
    with _lock:
        return _found.get((entry.group, entry.seq))


class _Watch:
    """The checks of one blocked wait: publish this rank's log, compare the peers' logs."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.since = time.monotonic()
        self.warned = False
        self.store = _store()
        self.me = dist.get_rank()
        self.peers = [r for r in _ranks(entry.group) if r != self.me]
        self.incarnation = _world[1]

    def fail(self, message: str) -> CollectiveError:
        """Abort the group's backend (its stuck work would block exit until the
        timeout), then the error to raise."""
        with _lock:
            _found[(self.entry.group, self.entry.seq)] = message
        for pg in _groups():
            if str(pg.group_name) == self.entry.group:
                try:
                    pg.abort()
                except (RuntimeError, AttributeError):  # a backend without abort
                    pass
                # Freeing the group (destroy_process_group, or the interpreter's teardown
                # of this module) would join its worker thread, which stays in the stuck
                # work until the timeout: the group is never freed (one leaked reference).
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(pg))
        return CollectiveError(message)

    def reported(self) -> str | None:
        """What a rank that found this group's ranks diverged published, if one did."""
        try:
            if self.store is None or not self.store.check([self._key("error")]):
                return None
            return self.store.get(self._key("error")).decode("utf-8", "replace")
        except RuntimeError:  # the store's host (rank 0) has gone: nothing to read
            return None

    def check(self) -> None:
        if self.store is None:
            return
        reported = self.reported()
        if reported is not None:
            raise self.fail(reported)
        with _lock:
            mine = {e.seq: e for e in _logs.get(self.entry.group, ())}
        record = {
            "blocked": self.entry.seq,
            "log": [[e.seq, e.what, e.shape] for e in mine.values()],
        }
        self.store.set(self._key(self.me), json.dumps(record))
        differ: dict[int, Entry] = {}
        silent = []
        for peer in self.peers:
            theirs = _read(self.store, self._key(peer), self.entry.group)
            if theirs is None:
                silent.append((peer, None))
                continue
            blocked, log = theirs
            for seq, e in sorted(log.items()):
                if seq in mine and e.what != mine[seq].what:
                    differ[peer] = e
                    break
            if blocked < self.entry.seq and peer not in differ:
                silent.append((peer, log.get(blocked)))
        if differ:
            message = self._message(mine, differ)
            self.store.set(self._key("error"), f"rank {self.me} found: {message}")
            raise self.fail(message)
        waited = time.monotonic() - self.since
        if silent and not self.warned and waited >= WARN_AFTER_S:
            self.warned = True
            warnings.warn(self._silence(silent, waited), RuntimeWarning, stacklevel=3)

    def _key(self, rank: int | str) -> str:
        return f"{_PREFIX}{self.incarnation}/{self.entry.group}/{rank}"

    def _message(self, mine: dict[int, Entry], differ: dict[int, Entry]) -> str:
        lines = []
        for peer, e in sorted(differ.items()):
            lines.append(
                f"call {e.seq} is {mine[e.seq].what}{mine[e.seq].shape} on rank {self.me} "
                f"but {e.what}{e.shape} on rank {peer}"
            )
        return (
            f"the ranks of group {self.entry.group!r} made different collective calls and "
            f"would wait for each other until the process group's timeout: {'; '.join(lines)} "
            f"(rank {self.me} is blocked in call {self.entry.show()}). Every rank must make "
            "the same calls in the same order with the same codec choice (check per-rank "
            "codec=, min_bytes and policy settings). The process group was aborted (its "
            "stuck work would block exit until the timeout): destroy it"
        )

    def _silence(self, silent: list[tuple[int, Entry | None]], waited: float) -> str:
        parts = []
        for peer, e in silent:
            last = "none recorded" if e is None else f"blocked in {e.show()}"
            parts.append(f"rank {peer} ({last})")
        return (
            f"commpress: rank {self.me} has waited {waited:.0f} s in call {self.entry.show()} "
            f"on group {self.entry.group!r}; these ranks have not reached it in a commpress "
            f"call: {', '.join(parts)}. They may still be computing, or be in a "
            "torch.distributed call commpress does not see (then all wait until the process "
            "group's timeout)"
        )


def _read(store: Any, key: str, group: str) -> tuple[int, dict[int, Entry]] | None:
    """A peer's record: the call it is blocked in and its log by call number."""
    if not store.check([key]):
        return None
    try:
        got = json.loads(store.get(key).decode("utf-8"))
        log = {int(s): Entry(group, int(s), str(w), str(sh)) for s, w, sh in got["log"]}
        return int(got["blocked"]), log
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None


def _groups() -> list[Any]:
    import torch.distributed.distributed_c10d as c10d

    return list(c10d._world.pg_names)


def _ranks(group: str) -> list[int]:
    for pg in _groups():
        if str(pg.group_name) == group:
            return dist.get_process_group_ranks(pg)
    return []


def _store() -> Any:
    import torch.distributed.distributed_c10d as c10d

    try:
        return c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None
