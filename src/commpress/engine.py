"""The engine: the execution resources reserved for compressed collectives.

An `Engine` decides *where* the encode -> transfer -> decode pipeline of a
collective runs, so that compression overlaps with the caller's compute:

CPU (gloo) -- run and tested
    One worker thread per process group runs the async calls of that group,
    one after the other, in the order they were issued (collectives must be
    issued in the same order on every rank; one ordered queue per group
    guarantees it for calls made from one thread). ``async_op=True`` returns
    a `Handle` at once. A blocking call runs on the calling thread when its
    group's queue is empty, and queues behind the pending calls otherwise, so
    blocking and async calls keep their issue order. torch kernels and gloo
    release the GIL, so the worker overlaps with Python in the caller.
    ``num_threads`` extra threads encode ahead: a tensor larger than
    ``chunk_bytes`` is cut into chunks, and chunk ``k+1`` is encoded while
    chunk ``k`` is on the wire.

CUDA (NCCL) -- written, NOT run: no GPU was available where this was built
    The engine owns one codec stream per device: from a CUDA green context
    with ``num_sms`` SMs (``torch.cuda.green_contexts.GreenContext.create``)
    when ``num_sms`` is set and the build supports it, else a high-priority
    ``torch.cuda.Stream``. A call records an event on the caller's current
    stream; the codec stream waits for it (no host sync), the encode, the
    NCCL collectives (issued while the codec stream is current, so NCCL
    orders them after the encode) and the decode run there, and an event
    recorded at the end is what `Handle.wait` makes the caller's stream wait
    for. Tensors touched on the codec stream are marked with
    ``record_stream``. What still syncs the host: the descriptor exchange of
    a compressed call reads the peers' sizes on the host (a small
    device-to-host copy); ``Policy(verify=False)`` with a fixed-size codec
    avoids it. The SMs that NCCL itself uses are capped in the process
    group's options, not here: ``NCCL_MAX_CTAS`` (environment) or
    ``ProcessGroupNCCL.Options().config.max_ctas`` passed as ``pg_options``
    to ``init_process_group``/``new_group``.

Every async call returns one `commpress.handle.Handle` (a
``torch.distributed.Work``, re-exported here); handles may be waited in any
order.

At interpreter exit (once an engine exists) `settle_backend_threads` gives the
backend's own threads a moment to free the buffers of finished calls before
Python finalizes; see its docstring for the abort this prevents.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .errors import CollectiveError, ConfigError
from .handle import Handle

__all__ = ["Engine", "Handle", "get_engine", "set_engine", "settle_backend_threads"]

#: How long `settle_backend_threads` releases the GIL at interpreter exit.
SETTLE_S = 0.05


def settle_backend_threads() -> None:
    """Let the backend's threads free finished calls' buffers; runs at interpreter exit.

    A compressed call hands gloo buffers of its own (payloads, descriptors) and
    drops its references once the backend's work completes. gloo's worker thread
    drops *its* reference just after completing the work; when it is the last owner
    of a tensor that has a Python object, it must take the GIL to free that object.
    If the interpreter has begun finalizing by then (a script whose last collective
    is the last thing it does: DDP's final bucket, then exit), Python ends that C++
    thread inside the work's destructor and the process aborts with ``terminate
    called without an active exception`` (seen in 2-rank ``torchrun`` runs of the
    DDP hook: about one exit in three on this 2-core machine). torch's
    ``destroy_process_group`` describes the same race for work hooks. Sleeping here,
    in ``atexit``, before finalization starts, releases the GIL so those threads
    finish first. A collective still *running* at exit is not covered: that is the
    caller's unfinished work, as it is without commpress.
    """
    time.sleep(SETTLE_S)


_settle_registered = [False]


def _settle_at_exit() -> None:
    if not _settle_registered[0]:
        _settle_registered[0] = True
        atexit.register(settle_backend_threads)


class _GroupQueue:
    """One ordered worker thread for the calls of one process group."""

    def __init__(self, name: str) -> None:
        self._jobs: collections.deque[tuple[Callable[[], Any], Handle]] = collections.deque()
        self._cond = threading.Condition()
        self.pending = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"commpress-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], handle: Handle) -> None:
        with self._cond:
            if self._closed:
                raise CollectiveError("the commpress engine was closed; use a new Engine")
            self._jobs.append((fn, handle))
            self.pending += 1
            self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return self.pending == 0

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _loop(self) -> None:
        _worker_state.in_worker = True
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                fn, handle = self._jobs.popleft()
            try:
                fn_result = fn()
            except BaseException as exc:  # noqa: BLE001 - delivered through the handle
                handle._finish(exc=exc)
            else:
                value, event = fn_result
                handle._finish(value, event=event)
            finally:
                with self._cond:
                    self.pending -= 1


_worker_state = threading.local()


class _CudaStreams:
    """The codec stream of one device (see the module docstring; not run here)."""

    def __init__(self, device: torch.device, num_sms: int | None, priority: int) -> None:
        self.green_context = None
        self.stream: Any = None
        if num_sms:
            try:
                from torch.cuda.green_contexts import GreenContext

                self.green_context = GreenContext.create(num_sms=num_sms, device_id=device.index)
                self.stream = self.green_context.Stream()
            except (RuntimeError, ImportError, AttributeError, TypeError) as exc:
                warnings.warn(
                    f"commpress: could not reserve {num_sms} SMs with a CUDA green context "
                    f"({exc}); using a high-priority stream on all SMs instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=device, priority=priority)


#: The most worker threads an `Engine` may own.
MAX_THREADS = 1024


class Engine:
    """Threads, streams and chunking for compressed collectives.

    Tuning guide, knob by knob (0/None = automatic):

    Args:
        num_threads: CPU threads that encode ahead while the group's worker thread
            transfers (the worker itself is always there, one per process group).
            1 (default) overlaps the encode of chunk ``k+1`` with the transfer of
            chunk ``k``; 0 encodes inline (least memory, no overlap). More only
            helps when encoding is slower than the wire; on a machine with few
            cores keep it at 0 or 1 -- gloo and the training loop need cores too.
        chunk_bytes: all-reduces of tensors larger than this are cut into chunks of
            about this many bytes and pipelined. On CPU with a fixed-size codec
            the chunks' transfers are posted asynchronously and travel while the
            calling thread encodes and decodes the neighbouring chunks, with one
            descriptor exchange per call; variable-size codecs (zstd, chains)
            encode ahead on the encode threads instead, one descriptor per chunk.
            Smaller chunks overlap better but pay the per-collective latency per
            chunk; 4 MiB (default) is a few hundred microseconds on a 10 GB/s
            link. 0 disables chunking. Every rank must use the same value.
        num_sms: CUDA only: SMs reserved for encode/decode through a green context
            (DeepSeek-V3 reserved 20 of 132 on H800 for communication). None: no
            reservation, a high-priority stream shares all SMs. Falls back to that,
            with a warning, when green contexts are not supported.
        stream_priority: CUDA only: priority of the codec stream when ``num_sms`` is
            None (lower is more urgent; -1 is high on current GPUs) so that encode
            kernels jump ahead of queued compute kernels.

    Not run here: every CUDA path (no GPU where this was written); see the module
    docstring for what it does.

    Example::

        import commpress
        from commpress.engine import Engine, set_engine
        set_engine(Engine(num_threads=1, chunk_bytes=8 << 20))
    """

    def __init__(
        self,
        num_threads: int = 1,
        chunk_bytes: int = 4 << 20,
        num_sms: int | None = None,
        stream_priority: int = -1,
    ) -> None:
        for name, value in (("num_threads", num_threads), ("chunk_bytes", chunk_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"Engine({name}={value!r}) is not allowed; expected an int >= 0")
        if num_threads > MAX_THREADS:
            raise ConfigError(
                f"Engine(num_threads={num_threads}) is not allowed; expected at most "
                f"{MAX_THREADS} (codec threads beyond the cores only contend)"
            )
        if num_sms is not None and (
            isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1
        ):
            raise ConfigError(
                f"Engine(num_sms={num_sms!r}) is not allowed; expected None or an int >= 1"
            )
        if isinstance(stream_priority, bool) or not isinstance(stream_priority, int):
            raise ConfigError(
                f"Engine(stream_priority={stream_priority!r}) is not allowed; expected an int"
            )
        self.num_threads = num_threads
        self.chunk_bytes = chunk_bytes
        self.num_sms = num_sms
        self.stream_priority = stream_priority
        self._lock = threading.Lock()
        self._queues: dict[str, _GroupQueue] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._cuda: dict[int, _CudaStreams] = {}
        self._closed = False
        _settle_at_exit()

    def __repr__(self) -> str:
        return (
            f"Engine(num_threads={self.num_threads}, chunk_bytes={self.chunk_bytes}, "
            f"num_sms={self.num_sms}, stream_priority={self.stream_priority})"
        )

    # ------------------------------------------------------------- ordering
    def _queue(self, key: str) -> _GroupQueue:
        with self._lock:
            if self._closed:
                raise CollectiveError("the commpress engine was closed; use a new Engine")
            q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = _GroupQueue(key)
            return q

    def idle(self, key: str) -> bool:
        """Whether no call of group ``key`` is queued or running (calls may run inline).

        Read without the locks (one dict lookup, one int; both atomic): a call issued
        earlier on this thread has already counted itself in ``pending``, so an idle
        answer can only be stale towards busy (a job that just finished), which queues
        the call behind nothing.
        """
        q = self._queues.get(key)
        if q is None or q.pending == 0:
            return True
        return getattr(_worker_state, "in_worker", False)  # a job calling back runs inline

    def run(
        self,
        key: str,
        fn: Callable[[], Any],
        *,
        async_op: bool,
        device: torch.device | None = None,
        tensors: Sequence[torch.Tensor] = (),
    ) -> Any:
        """Run ``fn`` (the whole collective, blocking) in issue order for group ``key``.

        Returns ``fn()``'s value, or a `Handle` for it when ``async_op``.
        """
        cuda = device is not None and device.type == "cuda"
        fence = torch.cuda.current_stream(device).record_event() if cuda else None

        def job() -> tuple[Any, Any]:
            if not cuda:  # no stream to enter (the common small call: no context manager)
                return fn(), None
            with self._codec_stream(device, fence, tensors) as done:
                value = fn()
            return value, done.event

        if async_op:
            handle = Handle()
            self._queue(key).submit(job, handle)
            return handle
        if self.idle(key):
            value, event = job()
            if event is not None:
                torch.cuda.current_stream(device).wait_event(event)
            return value
        handle = Handle()
        self._queue(key).submit(job, handle)
        handle.wait()
        return handle._value

    # ------------------------------------------------------------ encode threads
    def encode_pool(self) -> ThreadPoolExecutor:
        """The ``num_threads`` threads that encode chunks ahead (`commpress.algorithms.chunked`)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.num_threads, thread_name_prefix="commpress-encode"
                )
            return self._pool

    # ------------------------------------------------------------------ CUDA
    def _cuda_streams(self, device: torch.device) -> _CudaStreams:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            s = self._cuda.get(index)
            if s is None:
                s = self._cuda[index] = _CudaStreams(
                    torch.device("cuda", index), self.num_sms, self.stream_priority
                )
            return s

    def stream(self, device: torch.device) -> Any:
        """The codec stream of a CUDA ``device`` (created on first use)."""
        return self._cuda_streams(device).stream

    @contextlib.contextmanager
    def _codec_stream(
        self, device: torch.device | None, fence: Any, tensors: Sequence[torch.Tensor]
    ) -> Iterator[Any]:
        done = _Done()
        if device is None or device.type != "cuda":
            yield done
            return
        stream = self.stream(device)
        stream.wait_event(fence)  # the caller's pending writes to the inputs come first
        for t in tensors:
            if t.is_cuda:
                t.record_stream(stream)
        with torch.cuda.device(stream.device), torch.cuda.stream(stream):
            yield done
            done.event = stream.record_event()

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the worker threads after their queued calls; the engine cannot be used after."""
        with self._lock:
            self._closed = True
            queues, self._queues = list(self._queues.values()), {}
            pool, self._pool = self._pool, None
        for q in queues:
            q.close()
        if pool is not None:
            pool.shutdown(wait=False)


class _Done:
    event: Any = None


_engine_lock = threading.Lock()
_engine: Engine | None = None


def get_engine() -> Engine:
    """The process-wide engine (an ``Engine()`` with defaults until `set_engine`)."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                _engine = Engine()
    return _engine


def set_engine(engine: Engine | None) -> Engine:
    """Replace the process-wide engine (None: a fresh default one); returns it.

    The previous engine finishes its queued calls and then stops. Call this while
    no async call is pending on any group, since the new engine's queues do not wait
    for the old one's.
    """
    global _engine
    if engine is not None and not isinstance(engine, Engine):
        raise ConfigError(f"set_engine expects an Engine, got {type(engine).__name__}")
    with _engine_lock:
        old, _engine = _engine, engine if engine is not None else Engine()
        new = _engine
    if old is not None and old is not new:
        old.close()
    return new
