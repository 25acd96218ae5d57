"""Per-op counters of what the compressed collectives did: ``commpress.stats()``.

Every call of a `commpress.distributed` function adds to the counters of its
op (``"all_reduce"``, ``"broadcast"``, ...), in this process:

- ``calls`` -- calls made; ``compressed`` -- how many of them were encoded
  (the rest went to plain ``torch.distributed``: below ``min_bytes``,
  integer data, MIN/MAX, codec ``none``, ...);
- ``bytes_in`` -- bytes the plain ``torch.distributed`` call would have
  handed to the backend from this rank for other ranks: the input tensor,
  or for ``all_to_all`` and the reduce-scatters the input less this rank's
  own chunk or block (which never leaves the rank), so that the ratio of
  every op compares like with like;
- ``bytes_wire`` -- bytes commpress handed to the backend from this rank for
  other ranks: packed buffers (wire headers included; an all-to-all's piece
  for this rank itself is not counted), the small size descriptors, and
  for two-phase all-reduce the second-phase buffer too. For a call that was
  not compressed it equals ``bytes_in``. ``ratio = bytes_in / bytes_wire``;
- ``encode_s`` / ``transfer_s`` / ``decode_s`` -- host wall-clock seconds in
  each stage (on CUDA: the time to enqueue the work, not device time).

Counters are process-wide and thread-safe (async calls record from the
engine's worker threads). `stats()` returns a frozen snapshot; printing it
shows a table::

    >>> import commpress
    >>> commpress.reset_stats()
    >>> print(commpress.stats())
    op  calls  compressed  bytes_in  bytes_wire  ratio  encode_s  transfer_s  decode_s
    (no calls recorded)
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .units import format_size

__all__ = [
    "OpStats",
    "Stats",
    "stats",
    "reset_stats",
    "CallRecord",
    "PHASES",
    "call_range",
    "record",
    "record_plain",
]


@dataclass(frozen=True)
class OpStats:
    """Counters of one op; see the module docstring for what each field counts."""

    op: str
    calls: int = 0
    compressed: int = 0
    bytes_in: int = 0
    bytes_wire: int = 0
    encode_s: float = 0.0
    transfer_s: float = 0.0
    decode_s: float = 0.0

    @property
    def ratio(self) -> float:
        """``bytes_in / bytes_wire`` (1.0 when nothing was sent)."""
        return self.bytes_in / self.bytes_wire if self.bytes_wire else 1.0

    def __add__(self, other: OpStats) -> OpStats:
        return replace(
            self,
            calls=self.calls + other.calls,
            compressed=self.compressed + other.compressed,
            bytes_in=self.bytes_in + other.bytes_in,
            bytes_wire=self.bytes_wire + other.bytes_wire,
            encode_s=self.encode_s + other.encode_s,
            transfer_s=self.transfer_s + other.transfer_s,
            decode_s=self.decode_s + other.decode_s,
        )


_COLUMNS = (
    "op",
    "calls",
    "compressed",
    "bytes_in",
    "bytes_wire",
    "ratio",
    "encode_s",
    "transfer_s",
    "decode_s",
)


@dataclass(frozen=True)
class Stats:
    """A snapshot of every op's counters: ``stats()["all_reduce"].ratio``.

    Attributes:
        ops: op name -> `OpStats`, in the order the ops were first called.
    """

    ops: dict[str, OpStats] = field(default_factory=dict)

    def __getitem__(self, op: str) -> OpStats:
        """The counters of ``op`` (all zero if it was never called)."""
        return self.ops.get(op, OpStats(op))

    def __contains__(self, op: object) -> bool:
        return op in self.ops

    def __iter__(self):  # noqa: ANN204 - iterates OpStats
        return iter(self.ops.values())

    def total(self) -> OpStats:
        """Every op's counters added up (op name ``"total"``)."""
        out = OpStats("total")
        for s in self.ops.values():
            out = out + replace(s, op="total")
        return out

    def __str__(self) -> str:
        rows = [list(_COLUMNS)]
        for s in self.ops.values():
            rows.append(
                [
                    s.op,
                    str(s.calls),
                    str(s.compressed),
                    format_size(s.bytes_in),
                    format_size(s.bytes_wire),
                    f"{s.ratio:.2f}",
                    f"{s.encode_s:.4f}",
                    f"{s.transfer_s:.4f}",
                    f"{s.decode_s:.4f}",
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
            for r in rows
        ]
        if len(rows) == 1:
            lines.append("(no calls recorded)")
        return "\n".join(lines)


#: The stages of a compressed call, each timed into ``CallRecord.<stage>_s``.
PHASES = ("encode", "transfer", "decode")


@dataclass
class CallRecord:
    """What one call did; algorithms fill it in, `record` adds it to the counters."""

    op: str
    compressed: bool = False
    bytes_in: int = 0
    bytes_wire: int = 0
    encode_s: float = 0.0
    transfer_s: float = 0.0
    decode_s: float = 0.0

    def merge(self, part: CallRecord) -> None:
        """Add the wire bytes and stage times of ``part`` (one chunk of this call)."""
        self.bytes_wire += part.bytes_wire
        self.encode_s += part.encode_s
        self.transfer_s += part.transfer_s
        self.decode_s += part.decode_s

    def phase(self, name: str) -> _Phase:
        """Time the block into ``<name>_s`` and show it as ``commpress:<name>`` in profiles.

        ``name`` is one of `PHASES`. The range nests inside the call's own range
        (``commpress:all_reduce[int8]``), so ``torch.profiler`` traces show where a
        compressed call spends its time.
        """
        return _Phase(self, name)


class _Phase:
    """`CallRecord.phase`'s context manager: a class, not a generator (a small call
    enters about ten of them; each costs a fraction of a generator's)."""

    __slots__ = ("rec", "name", "t0", "range")

    def __init__(self, rec: CallRecord, name: str) -> None:
        self.rec = rec
        self.name = name
        self.range: Any = None

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        if _profiling():
            self.range = torch.profiler.record_function(f"commpress:{self.name}")
            self.range.__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.range is not None:
                self.range.__exit__(*exc)
        finally:
            field_name = f"{self.name}_s"
            rec = self.rec
            setattr(rec, field_name, getattr(rec, field_name) + time.perf_counter() - self.t0)


def _profiling() -> bool:
    """Whether a ``torch.profiler`` session records ranges (skip the cost when not)."""
    return torch.autograd.profiler._is_profiler_enabled


def call_range(op: str, spec: str) -> contextlib.AbstractContextManager[Any]:
    """The profiler range of one compressed call: ``commpress:<op>[<codec spec>]``."""
    if _profiling():
        return torch.profiler.record_function(f"commpress:{op}[{spec}]")
    return contextlib.nullcontext()


_lock = threading.Lock()
# op -> [calls, compressed, bytes_in, bytes_wire, encode_s, transfer_s, decode_s], added to
# in place (a call records in a few hundred nanoseconds); `stats` freezes them.
_ops: dict[str, list[Any]] = {}


def record(call: CallRecord) -> None:
    """Add one call to its op's counters (thread-safe)."""
    compressed = call.compressed
    wire = call.bytes_wire if compressed else call.bytes_in
    with _lock:
        c = _ops.get(call.op)
        if c is None:
            c = _ops[call.op] = [0, 0, 0, 0, 0.0, 0.0, 0.0]
        c[0] += 1
        c[1] += compressed
        c[2] += call.bytes_in
        c[3] += wire
        c[4] += call.encode_s
        c[5] += call.transfer_s
        c[6] += call.decode_s


def record_plain(op: str, nbytes: int, transfer_s: float) -> None:
    """Add one plain call of ``op`` (``nbytes`` in and on the wire) without a `CallRecord`:
    what ``record(CallRecord(op, bytes_in=nbytes, transfer_s=transfer_s))`` adds."""
    with _lock:
        c = _ops.get(op)
        if c is None:
            c = _ops[op] = [0, 0, 0, 0, 0.0, 0.0, 0.0]
        c[0] += 1
        c[2] += nbytes
        c[3] += nbytes
        c[5] += transfer_s


def stats() -> Stats:
    """A snapshot of the per-op counters of this process (see the module docstring)."""
    with _lock:
        rows = [(op, *c) for op, c in _ops.items()]
    return Stats({row[0]: OpStats(*row) for row in rows})  # type: ignore[arg-type]


def reset_stats() -> None:
    """Set every counter back to zero."""
    with _lock:
        _ops.clear()
