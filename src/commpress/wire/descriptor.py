"""The collective descriptor: one fixed-size ``int64`` row per rank.

On gloo, a collective whose ranks pass buffers of different sizes aborts
the process. So before a compressed collective moves any packed buffer,
every rank sends every other rank one row, its *descriptor* (in a *frame*,
below)::

    word  field
    0     magic + descriptor version (catches mixed commpress versions)
    1     op code (`OP_CODES`)
    2     algorithm wire code (declared by the algorithm; 0 for none)
    3     codec config hash (``Codec.config_hash`` as a signed int64)
    4     length of the codec spec string in bytes (<= ``MAX_SPEC``)
    5     dtype code of the input (``codec.DTYPE_CODES``, 0 for none)
    6     element count of this rank's input
    7     reduce op code (`redop_code`; -1 for ops that do not reduce)
    8     root (group rank) for rooted ops, else -1
    9     status: 0 ok, 1 this rank rejected its arguments
    10    elements per chunk of a chunked call (0: the call moves in one piece)
    11..  packed buffer size in bytes for each destination group rank

Every rank then holds the same ``(world, 11 + world)`` table and checks it
the same way (`DescriptorTable`), so all ranks raise together or proceed
together. On a codec hash mismatch the ranks all-gather their spec strings,
each padded to the longest (`spec_row`, `DescriptorTable.specs`), and raise
`CodecMismatchError` naming every rank's spec. The descriptor is also how
receivers learn the sizes of variable-size payloads (``zstd``, chains).

Frames: on CPU the rows travel in one ``all_to_all_single`` of frames
(`frame`): the row, one ``int64`` word with the number of payload bytes that
follow, then those bytes: a rank's packed buffer rides along when the frame
fits `frame_capacity` (`INLINE_BYTES` of payload, in groups of up to
`INLINE_MAX_WORLD` ranks), so a small compressed call is one round. Every
rank posts a receive of `frame_capacity` bytes for each peer whatever the
peer sends: gloo accepts a message smaller than its receive (a larger one
aborts), so ranks that disagree on the codec, the size or the op still get
every row and raise on the table. Elsewhere (NCCL wants equal sizes) the rows
are all-gathered and no payload rides along.

Moving the rows is the algorithms' business (``algorithms.common.exchange``);
building and reading them is this module's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..codec import CODE_DTYPES, DTYPE_CODES
from ..errors import CodecMismatchError, CollectiveError
from ..ops import OPS
from .packet import MAX_NUMEL, MAX_SPEC

__all__ = [
    "Descriptor",
    "DescriptorTable",
    "DESCRIPTOR_MAGIC",
    "FIXED_WORDS",
    "OP_CODES",
    "REDOP_NAMES",
    "redop_code",
    "signed64",
    "unsigned64",
    "spec_row",
    "INLINE_BYTES",
    "INLINE_MAX_WORLD",
    "Frames",
    "frame",
    "frame_capacity",
    "read_frames",
]

DESCRIPTOR_MAGIC = (0x434D5052 << 32) | 2  # "CMPR", descriptor version 2 (the chunk word)
FIXED_WORDS = 11

#: Public op name -> its descriptor code (`commpress.ops`, where the ops are listed).
OP_CODES: dict[str, int] = {name: o.code for name, o in OPS.items()}
REDOP_NAMES = ("SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR")
_OP_NAMES = {v: k for k, v in OP_CODES.items()}


def redop_code(op: Any) -> int:
    """A stable small code for a ``ReduceOp`` (-1 for None, 99 for one without a name)."""
    if op is None:
        return -1
    for i, name in enumerate(REDOP_NAMES):
        if op == getattr(dist.ReduceOp, name):
            return i
    return 99


def signed64(value: int) -> int:
    """``value`` (an unsigned 64-bit int, like a config hash) as the int64 that holds it."""
    return value - (1 << 64) if value >= 1 << 63 else value


def unsigned64(value: int) -> int:
    """Inverse of `signed64`."""
    return value + (1 << 64) if value < 0 else value


@dataclass(frozen=True)
class Descriptor:
    """One rank's descriptor row, as typed fields.

    Attributes:
        op: op code (`OP_CODES`).
        algorithm: the algorithm's wire code (0: none, e.g. in a rejection).
        config_hash: ``Codec.config_hash`` (unsigned 64-bit).
        spec_nbytes: length of the codec's spec string in UTF-8 bytes.
        dtype: dtype of the input (None: no input, or a dtype without a wire code).
        numel: element count of this rank's input.
        redop: `redop_code` of the reduce op.
        root: group rank of the root for rooted ops, else -1.
        status: 0 ok, 1 this rank rejected its arguments.
        chunk: elements per chunk when the call is pipelined in chunks, else 0; ranks
            whose engines cut a call differently would post transfers of other sizes.
        sizes: packed bytes this rank sends to each group rank.
    """

    op: int
    algorithm: int
    config_hash: int
    spec_nbytes: int
    dtype: torch.dtype | None
    numel: int
    redop: int = -1
    root: int = -1
    status: int = 0
    chunk: int = 0
    sizes: tuple[int, ...] = ()

    def to_tensor(self, world: int, device: torch.device) -> torch.Tensor:
        """The ``int64`` row of ``FIXED_WORDS + world`` words (missing sizes are 0)."""
        return torch.tensor(self.words(world), dtype=torch.int64, device=device)

    def words(self, world: int) -> list[int]:
        """The row as ``FIXED_WORDS + world`` Python ints (what `to_tensor` holds)."""
        if len(self.sizes) > world:
            raise ValueError(f"descriptor has {len(self.sizes)} sizes for a world of {world}")
        row = [
            DESCRIPTOR_MAGIC,
            self.op,
            self.algorithm,
            signed64(self.config_hash),
            self.spec_nbytes,
            DTYPE_CODES.get(self.dtype, 0) if self.dtype is not None else 0,
            self.numel,
            self.redop,
            self.root,
            self.status,
            self.chunk,
            *self.sizes,
        ]
        row += [0] * (FIXED_WORDS + world - len(row))
        return row

    def with_sizes(self, sizes: Sequence[int]) -> Descriptor:
        """This descriptor with other sizes (validated as in `from_row`)."""
        if not all(0 <= s <= MAX_NUMEL for s in sizes):
            raise ValueError(f"sizes {list(sizes)} out of range")
        return dataclasses.replace(self, sizes=tuple(sizes))

    @classmethod
    def from_row(cls, row: Sequence[int]) -> Descriptor:
        """Parse one row (its magic already checked); raises ValueError on a bad field."""
        (_, op, algorithm, config_hash, spec_nbytes, dcode, numel, redop, root, status, chunk) = (
            row[:FIXED_WORDS]
        )
        sizes = tuple(row[FIXED_WORDS:])
        if dcode and dcode not in CODE_DTYPES:
            raise ValueError(f"unknown dtype code {dcode}")
        if not 0 <= spec_nbytes <= MAX_SPEC:
            raise ValueError(f"spec length {spec_nbytes} (max {MAX_SPEC})")
        if status not in (0, 1):
            raise ValueError(f"status {status}")
        if not 0 <= chunk <= MAX_NUMEL:
            raise ValueError(f"chunk of {chunk} elements out of range")
        if not 0 <= numel <= MAX_NUMEL or not all(0 <= s <= MAX_NUMEL for s in sizes):
            raise ValueError(f"element count {numel} or sizes {list(sizes)} out of range")
        return cls(
            op=op,
            algorithm=algorithm,
            config_hash=unsigned64(config_hash),
            spec_nbytes=spec_nbytes,
            dtype=CODE_DTYPES.get(dcode),
            numel=numel,
            redop=redop,
            root=root,
            status=status,
            chunk=chunk,
            sizes=sizes,
        )


#: The most payload bytes a rank's frame carries after its descriptor row (see
#: `frame`), in groups of up to `INLINE_MAX_WORLD` ranks (beyond, frames carry the row
#: only: every rank receives ``world - 1`` frames of `frame_capacity` bytes at most).
INLINE_BYTES = 32 * 1024
INLINE_MAX_WORLD = 8


def frame_capacity(world: int) -> int:
    """Bytes each rank posts to receive every peer's frame in a descriptor round of a
    group of ``world`` ranks: the row, its payload length word and `INLINE_BYTES`.
    The same on every rank of the group, so no frame is larger than its receive
    (gloo aborts the process on that; a smaller message is fine)."""
    head = 8 * (FIXED_WORDS + world + 1)
    return head + (INLINE_BYTES if world <= INLINE_MAX_WORLD else 0)


def frame(words: Sequence[int], world: int, payload: torch.Tensor | None) -> torch.Tensor:
    """One rank's frame of a descriptor round: its row (``FIXED_WORDS + world`` int64),
    one int64 word, the payload bytes that follow (0: none), then those bytes.

    ``payload`` (``uint8``, 1-D, CPU) rides along only if the frame then fits in
    `frame_capacity`; else the frame is the row and a 0 word.
    """
    head = 8 * (FIXED_WORDS + world + 1)
    n = 0 if payload is None or head + payload.numel() > frame_capacity(world) else payload.numel()
    key = (*words, n)
    got = _heads.get(key)
    if got is None:  # a call's row repeats from call to call: made once, read-only after
        if len(_heads) >= _CACHED:
            _heads.clear()
        got = _heads[key] = torch.tensor(key, dtype=torch.int64).view(torch.uint8)
    return torch.cat([got, payload]) if n else got


_CACHED = 1024
_heads: dict[tuple[int, ...], torch.Tensor] = {}


@dataclass(frozen=True)
class Frames:
    """What a descriptor round received: every rank's row and the payloads that came
    with them.

    Attributes:
        rows: ``world`` rows of ints (this rank's own row included).
        payloads: per rank, the payload bytes its frame carried (this rank's own
            ``payload`` if it rode along), or None where the frame carried none.
    """

    rows: list[list[int]]
    payloads: list[torch.Tensor | None]


def read_frames(
    received: torch.Tensor,
    world: int,
    rank: int,
    words: Sequence[int],
    mine: torch.Tensor | None,
) -> Frames:
    """Parse the ``world - 1`` peer frames of a round (``received``: the peers' frames in
    rank order, each in a slot of `frame_capacity` bytes) around this rank's own
    ``words`` and the payload ``mine`` it sent (None: none rode along).

    A payload length that does not fit its slot is read as no payload (the row then
    fails its checks or the caller moves the payload in a second round, alike on every
    rank: every rank received the same frame from that peer).
    """
    cap = frame_capacity(world)
    width = FIXED_WORDS + world
    head = 8 * (width + 1)
    got = received.view(world - 1, cap)[:, :head].view(torch.int64).tolist()
    rows: list[list[int]] = []
    payloads: list[torch.Tensor | None] = []
    for r in range(world):
        if r == rank:
            rows.append(list(words))
            payloads.append(mine)
            continue
        slot = r if r < rank else r - 1
        words_r = got[slot]
        n = words_r[width]
        rows.append(words_r[:width])
        ok = 0 < n <= cap - head
        start = slot * cap + head
        payloads.append(received[start : start + n] if ok else None)
    return Frames(rows, payloads)


_uniform_tables: dict[tuple[Any, ...], DescriptorTable] = {}


def spec_row(spec: str, length: int, device: torch.device) -> torch.Tensor:
    """``spec`` as UTF-8 bytes zero-padded to ``length`` (at least 1) bytes, for the
    all-gather of specs after a hash mismatch (`DescriptorTable.longest_spec`)."""
    mine = spec.encode()
    row = torch.zeros(max(length, 1), dtype=torch.uint8, device=device)
    if mine:
        row[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8).to(device)
    return row


@dataclass(frozen=True)
class DescriptorTable:
    """Every rank's descriptor, ``rows[rank]``, parsed from the all-gathered rows.

    The checks raise the same error on every rank, because every rank holds the
    same table. Call them in order: `check_status`, then `same_codec` (and on
    False the specs exchange, then `codec_mismatch`), then `check_call`.
    """

    op: str
    rows: tuple[Descriptor, ...]
    #: Every row holds the same fixed words (a status of 0 included), so the checks
    #: cannot fail; `from_rows` then parsed one row and took only the others' sizes.
    uniform: bool = False
    #: Per rank, the packed payload that came with its row in the descriptor round
    #: (None where none did); None when the caller sent no payload along.
    payloads: tuple[torch.Tensor | None, ...] | None = None

    @classmethod
    def from_tensor(cls, table: torch.Tensor, world: int, op: str) -> DescriptorTable:
        """Parse ``world`` all-gathered rows (one flat or ``(world, W)`` ``int64`` tensor).

        Raises:
            CollectiveError: the rows are not ``FIXED_WORDS + world`` words each, a
                rank's magic differs (another commpress version), or a field is malformed.
        """
        width = FIXED_WORDS + world
        if table.dtype != torch.int64 or table.numel() != world * width:
            raise CollectiveError(
                f"{op}: descriptor table of {table.numel()} {table.dtype} words, expected "
                f"{world} rows of {width} int64"
            )
        return cls.from_rows(table.reshape(world, width).tolist(), op)

    @classmethod
    def from_rows(cls, raw: Sequence[Sequence[int]], op: str) -> DescriptorTable:
        """Parse one row of ints per rank, each ``FIXED_WORDS + len(raw)`` long (the
        caller checked the width). Raises `CollectiveError` like `from_tensor`.

        A table whose rows agree (`uniform`) is a pure function of the rows: the parse of
        rows seen before is looked up (a small call's rows repeat from call to call)."""
        key = (op, *map(tuple, raw))
        table = _uniform_tables.get(key)
        if table is None:
            table = cls._parse(raw, op)
            if table.uniform:
                if len(_uniform_tables) >= _CACHED:
                    _uniform_tables.clear()
                _uniform_tables[key] = table
        return table

    @classmethod
    def _parse(cls, raw: Sequence[Sequence[int]], op: str) -> DescriptorTable:
        head = list(raw[0][:FIXED_WORDS])
        if (
            head[0] == DESCRIPTOR_MAGIC
            and head[9] == 0
            and all(list(r[:FIXED_WORDS]) == head for r in raw)
        ):
            # The steady state: every rank describes the same call, only the sizes may
            # differ. One row is parsed; the others' sizes are checked as they are taken.
            try:
                first = Descriptor.from_row(raw[0])
                rows = tuple(first.with_sizes(r[FIXED_WORDS:]) for r in raw)
            except ValueError:
                pass  # the general path below names the malformed row
            else:
                return cls(op, rows, uniform=True)
        if any(row[0] != DESCRIPTOR_MAGIC for row in raw):
            raise CollectiveError(
                f"{op}: ranks run different commpress versions (descriptor magic differs)"
            )
        rows = []
        for r, row in enumerate(raw):
            try:
                rows.append(Descriptor.from_row(row))
            except ValueError as exc:
                raise CollectiveError(
                    f"{op}: the descriptor of rank {r} is malformed: {exc}"
                ) from None
        return cls(op, tuple(rows))

    # ------------------------------------------------------------ reading
    def sizes_from(self, rank: int) -> list[int]:
        """Packed sizes ``rank`` sends to each destination."""
        return list(self.rows[rank].sizes)

    def first_sizes(self) -> list[int]:
        """Each rank's first size (what it sends to every rank, or to a root)."""
        return [row.sizes[0] for row in self.rows]

    def sizes_to(self, dest: int) -> list[int]:
        """Packed sizes each rank sends to ``dest``."""
        return [row.sizes[dest] for row in self.rows]

    def numel(self, rank: int) -> int:
        """Element count of ``rank``'s input."""
        return self.rows[rank].numel

    @property
    def longest_spec(self) -> int:
        """The longest spec length any rank announced (the width of the spec exchange)."""
        return max(row.spec_nbytes for row in self.rows)

    # ------------------------------------------------------------ checking
    def check_status(self, reasons: Callable[[list[int]], dict[int, str]] | None = None) -> None:
        """Raise `CollectiveError` if a rank rejected its arguments or the ops differ.

        ``reasons(ranks)``: why each rejecting rank did (``{rank: message}``, '' if unknown).
        """
        if self.uniform:
            return
        bad = [r for r, row in enumerate(self.rows) if row.status != 0]
        if bad:
            why = reasons(bad) if reasons is not None else {}
            told = "; ".join(f"rank {r}: {why[r]}" for r in bad if why.get(r))
            raise self._fail(
                f"rank(s) {bad} of the group rejected their arguments; nothing was sent"
                + (f" ({told})" if told else " (see the error raised there)")
            )
        self._agree("op", lambda d: d.op, lambda v: _OP_NAMES.get(v, str(v)))

    def same_codec(self) -> bool:
        """Whether every rank uses the same codec config (equal hashes)."""
        return self.uniform or len({row.config_hash for row in self.rows}) == 1

    def specs(self, gathered: torch.Tensor) -> list[str]:
        """Every rank's spec from the all-gathered `spec_row`s (``world * longest_spec``
        ``uint8``, or a ``(world, longest_spec)`` tensor)."""
        width = max(self.longest_spec, 1)
        if gathered.dtype != torch.uint8 or gathered.numel() != len(self.rows) * width:
            raise CollectiveError(
                f"{self.op}: spec table of {gathered.numel()} {gathered.dtype} elements, "
                f"expected {len(self.rows)} rows of {width} bytes"
            )
        table = gathered.reshape(len(self.rows), width).cpu()
        return [
            bytes(table[r, : row.spec_nbytes].tolist()).decode(errors="replace")
            for r, row in enumerate(self.rows)
        ]

    def codec_mismatch(self, specs: Sequence[str], rank: int) -> CodecMismatchError:
        """The error naming every rank's spec (from `specs`), as seen by ``rank``."""
        by_spec: dict[str, list[int]] = {}
        for r, s in enumerate(specs):
            by_spec.setdefault(s, []).append(r)
        listing = "; ".join(
            f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}: {s!r}"
            for s, rs in by_spec.items()
        )
        return CodecMismatchError(
            f"{self.op}: codec mismatch across ranks ({listing}); this rank ({rank}) uses "
            f"{specs[rank]!r}. Every rank must pass the same codec= (or run under the same "
            "policy); nothing was sent"
        )

    def check_call(self, *, same_numel: bool, algorithm_name: Callable[[int], str] = str) -> None:
        """Raise `CollectiveError` if the ranks disagree on the algorithm, dtype, element
        count (when ``same_numel``), reduce op, root or chunking.

        Args:
            same_numel: every rank must pass the same number of elements.
            algorithm_name: how to show an algorithm wire code in the message.
        """
        if self.uniform:
            return
        self._agree(
            "algorithm (set the same Policy.algorithm on every rank)",
            lambda d: d.algorithm,
            algorithm_name,
        )
        self._agree("dtype", lambda d: d.dtype, str)
        if same_numel:
            self._agree("number of elements", lambda d: d.numel, str)
        self._agree(
            "reduce op",
            lambda d: d.redop,
            lambda v: REDOP_NAMES[v] if 0 <= v < len(REDOP_NAMES) else str(v),
        )
        self._agree("root rank (group rank of src/dst)", lambda d: d.root, str)
        self._agree(
            "chunking (set the same Engine(chunk_bytes=...) on every rank)",
            lambda d: d.chunk,
            lambda v: f"{v} elements per chunk" if v else "one piece",
        )

    def _agree(self, what: str, field: Callable[[Descriptor], Any], show: Callable) -> None:
        values = [field(row) for row in self.rows]
        if len(set(values)) > 1:
            listing = ", ".join(f"rank {r}: {show(v)}" for r, v in enumerate(values))
            raise self._fail(f"ranks disagree on the {what}: {listing}")

    def _fail(self, what: str) -> CollectiveError:
        return CollectiveError(f"{self.op}: {what}")
