"""`Handle`: the one thing every async commpress call returns, a ``torch.distributed.Work``.

`commpress.distributed` (``async_op=True``, ``isend``, ``irecv``), the
collectives swapped in by `commpress.patch`, `commpress.moe` and
`commpress.pipeline` all return a `Handle`. It subclasses
``torch.distributed.Work``, so ``isinstance(h, dist.Work)`` holds and torch
code that is handed one (FSDP2 waits on it only if it is a ``Work``; C++
callers reach ``wait`` and ``get_future`` through torch's trampoline) treats
it as its own.

What a call produces travels through the handle's own methods, never
through attributes bolted on afterwards:

- ``result()``: the output tensors (a ``list``, as ``Work.result()``), e.g.
  the tensor a pipeline receive filled or the ``[T, H]`` output of an async
  MoE combine;
- ``source_rank()``: the sender's global rank of a receive;
- ``layout``: what a call fixed when it was issued and a later call needs
  (`commpress.moe.dispatch` puts its `commpress.moe.DispatchLayout` there).

A handle is finished in one of two ways: by its producer (the engine's worker
calls ``_finish``) or lazily, for calls handed to the backend directly, by a
``completer`` that blocks until the backend's works are done and returns the
outputs; it runs once, on the first ``wait``, ``get_future`` or successful
``poll``.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .errors import CollectiveError

__all__ = ["Handle"]


class Handle(dist.Work):
    """The result of an async commpress call: a ``torch.distributed.Work``.

    ``wait()`` blocks until the call is done (on CUDA: until its work is queued,
    and makes the caller's current stream wait for it) and re-raises its error;
    ``is_completed()`` asks without blocking; ``get_future()`` returns a
    ``torch.futures.Future`` whose value is the list of output tensors.

    Args:
        completer: blocks until the call's backend works are done and returns its
            outputs (see the module docstring); None when a producer calls
            ``_finish``.
        poll: asks the backend, without blocking, whether ``completer`` would
            return at once.
        layout: what the call fixed at issue time for later calls (``moe.dispatch``:
            its `commpress.moe.DispatchLayout`); None for most calls.
        source_rank: the sender's global rank, for a receive whose sender is known
            when it is posted; a receive from any source learns it in ``_finish``.
    """

    def __init__(
        self,
        completer: Callable[[], Any] | None = None,
        poll: Callable[[], bool] | None = None,
        *,
        layout: Any = None,
        source_rank: int | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        self._issued = threading.Event()
        self._lock = threading.Lock()
        self._completing = threading.Lock()
        self._value: Any = None
        self._exc: BaseException | None = None
        self._event: Any = None  # CUDA event recorded at the end of the work
        self._future: torch.futures.Future | None = None
        self._completer = completer
        self._poll = poll
        self._sender = source_rank

    def __repr__(self) -> str:
        state = "done" if self._issued.is_set() else "pending"
        return f"Handle({state})"

    @classmethod
    def done(cls, value: Any, *, layout: Any = None) -> Handle:
        """A handle that is already complete with ``value``."""
        h = cls(layout=layout)
        h._finish(value)
        return h

    # ---------------------------------------------------------- producer side
    def _finish(
        self,
        value: Any = None,
        exc: BaseException | None = None,
        event: Any = None,
        source_rank: int | None = None,
    ) -> None:
        with self._lock:
            if self._issued.is_set():
                return
            self._value, self._exc, self._event = value, exc, event
            if source_rank is not None:
                self._sender = source_rank
            self._issued.set()
            future = self._future
        if future is not None:
            self._resolve(future)

    def _resolve(self, future: torch.futures.Future) -> None:
        if self._event is not None and not self._event.query():
            # CUDA work still running: resolve once it is done, on a helper thread, so that
            # neither the caller nor the engine's worker blocks on the device.
            def later() -> None:
                self._event.synchronize()
                self._set(future)

            threading.Thread(target=later, name="commpress-future", daemon=True).start()
            return
        self._set(future)

    def _set(self, future: torch.futures.Future) -> None:
        if self._exc is not None:
            future.set_exception(self._exc)
        else:
            future.set_result(self._value)

    def _complete_lazily(self) -> None:
        if self._issued.is_set() or self._completer is None:
            return
        with self._completing:  # the completer runs once, whoever gets here first
            if self._issued.is_set():
                return
            try:
                value = self._completer()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                self._finish(exc=exc)
            else:
                self._finish(value)

    # ---------------------------------------------------------- consumer side
    def wait(self, timeout: datetime.timedelta | float | None = None) -> bool:
        """Block until done; re-raise the call's error. Returns True, like ``Work.wait``.

        Args:
            timeout: seconds or a ``timedelta``; None or 0 (what torch's C++ passes
                for "no timeout") wait as long as the process group's own timeout
                allows.

        Raises:
            CollectiveError: the call failed, or ``timeout`` passed first.
        """
        self._complete_lazily()
        seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout
        if not self._issued.wait(seconds or None):
            raise CollectiveError(f"commpress handle did not complete within {seconds} s")
        if self._exc is not None:
            raise self._exc
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
        return True

    def is_completed(self) -> bool:
        """True when the call has finished (successfully or not); never blocks."""
        if not self._issued.is_set() and self._poll is not None and self._poll():
            self._complete_lazily()
        if not self._issued.is_set():
            return False
        return self._event is None or bool(self._event.query())

    def is_success(self) -> bool:
        """True when the call finished without an error."""
        return self.is_completed() and self._exc is None

    def exception(self) -> BaseException | None:
        """The call's error once it finished, else None."""
        return self._exc if self._issued.is_set() else None

    def result(self) -> list[torch.Tensor]:
        """The output tensors (after `wait`, which it calls), like ``Work.result()``."""
        self.wait()
        return self._value if isinstance(self._value, list) else [self._value]

    def source_rank(self) -> int:
        """The sender's global rank, for a receive, like ``Work.source_rank()``.

        Raises:
            CollectiveError: this handle is not a receive, or a receive from any
                source that has not completed yet (the sender is not known).
        """
        if self._sender is None:
            raise CollectiveError(
                "source_rank() is known only for a receive, once it completed "
                "(from any source) or from its posting (from a given source)"
            )
        return self._sender

    def _source_rank(self) -> int:
        """``source_rank()`` under the private name torch's own tests call on a ``Work``."""
        return self.source_rank()

    def get_future(self) -> torch.futures.Future:
        """A ``torch.futures.Future`` resolved with the output tensors (or the error)."""
        with self._lock:
            if self._future is None:
                self._future = torch.futures.Future()
                finished = self._issued.is_set()
            else:
                return self._future
        if finished:
            self._resolve(self._future)
        elif self._completer is not None:
            threading.Thread(
                target=self._complete_lazily, name="commpress-handle", daemon=True
            ).start()
        return self._future
