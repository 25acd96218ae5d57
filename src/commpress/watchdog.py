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
  other's first record. The rank that found it first publishes it and waits
  (two slices at most) until the peers blocked in that call have read it:
  its abort closes their connections, and if it hosts the store and leaves,
  a peer woken by the closed connection could not read why.
- A peer with no record, or blocked in an earlier call (it computes, or it
  is in a call commpress does not see, e.g. an unpatched
  ``torch.distributed`` call), is not an error: a long evaluation on rank 0
  while the others wait is a normal program. After `WARN_AFTER_S` the rank
  warns once, naming those peers and where they were last blocked.

- A peer blocked in a ``torch.distributed`` call made directly (not through
  commpress) is found by its answer, not its log: every process that made a
  commpress call runs one daemon thread (``commpress-watchdog``) that looks,
  once per slice, whether a blocked peer asked it where it is
  (``.../ask/<rank>``), and answers (``.../where/<rank>``) with the
  ``torch.distributed`` collectives its threads are inside of that no
  commpress frame called (from their Python stacks), with each one's group.
  Such a call on the blocked call's group is evidence: every rank blocked in
  commpress raises, naming it. The answering rank cannot be woken from its
  backend wait; it prints the error on stderr and fails when the others
  leave. A process that never made a commpress call has no such thread: a
  peer blocked on it only warns (above).
- A rank whose arguments are bad raises before anything is sent, and tells
  its peers through the descriptor exchange (`commpress.algorithms.common.reject`).
  The reason goes through the store (`tell_rejection`, `rejections`), so the
  peers' error names the rank and its problem, not only that it rejected.

Before raising, the rank aborts the group's backend (``ProcessGroup.abort``):
the stuck backend work would otherwise keep the process from exiting until
the timeout. The group cannot be used again: destroy it. CUDA (NCCL)
waits are not sliced: NCCL's own watchdog and flight recorder cover them.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import datetime
import json
import os
import sys
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
    "direct_calls",
    "explain",
    "group_name",
    "interval_s",
    "rejections",
    "running",
    "tell_rejection",
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


_whats: dict[tuple[str, str | None, torch.dtype], str] = {}


def begin(group: str, op: str, codec: str | None, tensor: torch.Tensor) -> Entry:
    """Number a call on ``group`` (in the caller's issue order) and log it."""
    what = _whats.get((op, codec, tensor.dtype))
    if what is None:  # a few per program: op x codec x dtype
        kind = "plain" if codec is None else codec
        dtype = str(tensor.dtype).removeprefix("torch.")
        what = _whats[op, codec, tensor.dtype] = f"{op} {kind} {dtype}"
    if _responder[0] is None:
        _start_responder()
    with _lock:
        log = _log_locked(group)
        entry = Entry(group, log[-1].seq + 1 if log else 1, what, f"[{tensor.numel()}]")
        log.append(entry)
        return entry


def _log_locked(group: str) -> collections.deque[Entry]:
    _world_check_locked()  # a new default group: numbering starts again
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
    step, slice_ = _slice()
    if entry is None or step == 0 or (device is not None and device.type != "cpu"):
        work.wait()
        return
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


_slices: dict[str | None, tuple[float, datetime.timedelta]] = {}


def _slice() -> tuple[float, datetime.timedelta]:
    """`interval_s` and its ``timedelta``, parsed once per value of the variable (every
    wait asks: a blocking small call's wait is a few microseconds of Python in all)."""
    raw = os.environ.get(ENV_INTERVAL)
    got = _slices.get(raw)
    if got is None:
        step = interval_s()
        got = _slices[raw] = (step, datetime.timedelta(seconds=step))
    return got


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
        self.asked: dict[int, int] = {}  # peer -> the ask count its answer must reach

    def fail(self, message: str) -> CollectiveError:
        """Abort the group's backend (its stuck work would block exit until the
        timeout), then the error to raise. Tells the rank that found the divergence
        first (`_await_peers`)."""
        with _lock:
            _found[(self.entry.group, self.entry.seq)] = message
        if self.store is not None:
            try:
                self.store.set(self._seen_key(self.me), "1")
            except RuntimeError:  # the store's host (rank 0) has gone
                pass
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
        return None if self.store is None else _get(self.store, self._key("error"))

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
        waiting = []  # peers blocked in a commpress wait of this call or a later one
        for peer in self.peers:
            theirs = _read(self.store, self._key(peer), self.entry.group)
            if theirs is None:
                silent.append((peer, None))
                continue
            blocked, log = theirs
            if blocked >= self.entry.seq:
                waiting.append(peer)
            for seq, e in sorted(log.items()):
                if seq in mine and e.what != mine[seq].what:
                    differ[peer] = e
                    break
            if blocked < self.entry.seq and peer not in differ:
                silent.append((peer, log.get(blocked)))
        raw = self._raw_calls([peer for peer, _ in silent])
        if differ or raw:
            message = self._message(mine, differ, raw)
            self.store.set(self._key("error"), f"rank {self.me} found: {message}")
            self.store.set(self._seen_key(self.me), "1")  # for a peer that found it too
            self._await_peers(waiting)
            raise self.fail(message)
        waited = time.monotonic() - self.since
        if silent and not self.warned and waited >= WARN_AFTER_S:
            self.warned = True
            warnings.warn(self._silence(silent, waited), RuntimeWarning, stacklevel=3)

    def _await_peers(self, peers: list[int]) -> None:
        """Wait (at most two slices and a second) until ``peers`` have read the error.

        Aborting closes this rank's connections: a peer still in its backend wait then
        fails with "connection closed", and if this rank hosts the store and has left,
        it cannot read why. Each peer in a sliced wait reads the error at its next slice
        and marks it seen (`fail`) before it aborts.
        """
        deadline = time.monotonic() + 2 * _slice()[0] + 1.0
        keys = [self._seen_key(peer) for peer in peers]
        while keys and time.monotonic() < deadline:
            keys = [key for key in keys if _get(self.store, key) is None]
            if keys:
                time.sleep(0.02)

    def _raw_calls(self, peers: list[int]) -> dict[int, str]:
        """The silent ``peers`` that answered they are in a direct ``torch.distributed``
        call on this group: ``{rank: "torch.distributed.<op>"}``. Asks the others
        (answers come by the next slice)."""
        found: dict[int, str] = {}
        for peer in peers:
            answer = _answer(self.store, self.incarnation, peer)
            if answer is not None and answer.get("asked", 0) >= self.asked.get(peer, 1):
                for op, group in answer.get("calls", ()):
                    if group == self.entry.group:
                        found[peer] = f"torch.distributed.{op}"
            if peer not in found and peer not in self.asked:
                self.asked[peer] = int(self.store.add(_ask_key(self.incarnation, peer), 1))
        return found

    def _key(self, rank: int | str) -> str:
        return f"{_PREFIX}{self.incarnation}/{self.entry.group}/{rank}"

    def _seen_key(self, rank: int) -> str:
        """Where ``rank`` marks that it read this call's error (`_await_peers`)."""
        return self._key(f"seen/{rank}")

    def _message(
        self, mine: dict[int, Entry], differ: dict[int, Entry], raw: dict[int, str]
    ) -> str:
        lines = []
        for peer, e in sorted(differ.items()):
            lines.append(
                f"call {e.seq} is {mine[e.seq].what}{mine[e.seq].shape} on rank {self.me} "
                f"but {e.what}{e.shape} on rank {peer}"
            )
        for peer, call in sorted(raw.items()):
            lines.append(
                f"rank {self.me} is in call {self.entry.show()} but rank {peer} is in "
                f"{call}, called directly (not through commpress)"
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
    text = _get(store, key)
    if text is None:
        return None
    try:
        got = json.loads(text)
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


# ------------------------------------------------------------ the responder
#: ``torch.distributed`` functions whose frame on a thread's stack means that
#: thread is in (or entering) a backend call.
_TORCH_CALLS = frozenset(
    "all_reduce all_gather all_gather_into_tensor reduce_scatter reduce_scatter_tensor "
    "broadcast reduce gather scatter all_to_all all_to_all_single barrier send recv "
    "all_gather_object broadcast_object_list gather_object scatter_object_list".split()
)
_C10D_FILE = os.path.join("torch", "distributed", "distributed_c10d.py")
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_responder: list[threading.Thread | None] = [None]
_stopping = threading.Event()


def _ask_key(incarnation: int, rank: int) -> str:
    return f"{_PREFIX}{incarnation}/ask/{rank}"


def _where_key(incarnation: int, rank: int) -> str:
    return f"{_PREFIX}{incarnation}/where/{rank}"


def _answer(store: Any, incarnation: int, rank: int) -> dict[str, Any] | None:
    text = _get(store, _where_key(incarnation, rank))
    try:
        got = None if text is None else json.loads(text)
    except ValueError:
        return None
    return got if isinstance(got, dict) else None


def _get(store: Any, key: str) -> str | None:
    """The store's value of ``key`` as text, or None when it is not set or the store's
    host (rank 0) has gone."""
    try:
        if not store.check([key]):
            return None
        return store.get(key).decode("utf-8", "replace")
    except RuntimeError:
        return None


def _start_responder() -> None:
    with _lock:
        if _responder[0] is not None or interval_s() == 0:
            return
        thread = threading.Thread(target=_respond_forever, name="commpress-watchdog", daemon=True)
        _responder[0] = thread
    thread.start()
    atexit.register(_stop_responder)


def _stop_responder() -> None:
    """Stop the responder before the interpreter finalizes: a daemon thread that comes
    back from a store call (C++) after finalization began would abort the process."""
    _stopping.set()
    thread = _responder[0]
    if thread is not None:
        thread.join(timeout=2.0)


def _respond_forever() -> None:
    answered: dict[int, int] = {}  # incarnation -> the ask count last answered
    warned: set[str] = set()
    while not _stopping.wait(max(interval_s(), 0.2)):
        try:
            _respond(answered, warned)
        except (
            RuntimeError,
            ValueError,
            AttributeError,
            OSError,
        ):  # no group, or the store is gone
            continue


def _respond(answered: dict[int, int], warned: set[str]) -> None:
    """Answer a peer's question, if one was asked since the last answer (module docstring)."""
    store, incarnation = _store(), _world[1]
    if store is None or not dist.is_initialized():
        return
    me = dist.get_rank()
    key = _ask_key(incarnation, me)
    if not store.check([key]):
        return
    asked = int(store.add(key, 0))
    calls = direct_calls()
    if asked > answered.get(incarnation, 0):
        answered[incarnation] = asked
        store.set(_where_key(incarnation, me), json.dumps({"asked": asked, "calls": calls}))
    for _, group in calls:  # tell this rank's user too, once the peers found it
        error = f"{_PREFIX}{incarnation}/{group}/error"
        found = None if group in warned else _get(store, error)
        if found is not None:
            warned.add(group)
            sys.stderr.write(
                f"commpress: rank {me} is blocked in a direct torch.distributed call: {found}\n"
            )


def direct_calls() -> list[tuple[str, str]]:
    """``(op, group name)`` of each ``torch.distributed`` collective some thread of this
    process is inside of, called directly (no commpress frame on that thread's stack)."""
    found = []
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        call, f = None, frame
        while f is not None:
            name = f.f_code.co_filename
            if name.startswith(_OWN_DIR):
                call = None  # commpress made it: its own watch covers it
                break
            if call is None and f.f_code.co_name in _TORCH_CALLS and name.endswith(_C10D_FILE):
                call = (f.f_code.co_name, group_name(f.f_locals.get("group")))
            f = f.f_back
        if call is not None:
            found.append(call)
    return found


def group_name(group: Any) -> str:
    """The name the logs use for ``group`` (None: the default group); the call driver's
    key of the group (`commpress.distributed.call.group_key`) is this."""
    pg = group if group is not None else dist.group.WORLD
    try:
        return str(pg.group_name)
    except (AttributeError, RuntimeError):
        return f"pg{id(pg)}"


# ------------------------------------------------------------- rejections
def _rejection_key(group: str, rank: int) -> str:
    """Keyed by the call's number on ``group`` (the one `running` marked): the same on
    every rank, so a peer reads the reason of this very call, never an older one's."""
    entry = getattr(_local, "entry", None)
    seq = entry.seq if entry is not None and entry.group == group else 0
    return f"{_PREFIX}{_world[1]}/{group}/rejected/{seq}/{rank}"


def tell_rejection(group: str, rank: int, reason: str) -> None:
    """Publish why this rank (``rank`` of ``group``) rejects the running call's arguments;
    called before the rejecting descriptor exchange, so peers find it after theirs."""
    store = _store()
    if store is not None:
        store.set(_rejection_key(group, rank), reason[:2000])


def rejections(group: str, ranks: list[int]) -> dict[int, str]:
    """Why each of ``ranks`` (of ``group``) rejected the running call; '' where unknown."""
    store = _store()
    out = {rank: "" for rank in ranks}
    if store is None:
        return out
    for rank in ranks:
        out[rank] = _get(store, _rejection_key(group, rank)) or ""
    return out


def _world_check_locked() -> None:
    world = dist.group.WORLD
    if _world[0] is not world:
        _world[0], _world[1] = world, _world[1] + 1
        _logs.clear()
