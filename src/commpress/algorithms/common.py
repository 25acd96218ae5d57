"""What every algorithm shares: the call context, the descriptor exchange, byte transfers.

Descriptor exchange
-------------------
On gloo, a collective whose ranks pass buffers of different sizes aborts
the process. So before a compressed collective moves any packed buffer,
every rank sends every rank one fixed-size ``int64`` row, its *descriptor*
(`commpress.wire.descriptor` holds the format and its checks), in one
``all_to_all_single`` whose receives are large enough for any frame; a
small packed buffer rides along (`exchange`'s ``payload``, `inline`), so the
call needs no round of its own. Every rank then holds the same table and
checks it the same way, so all ranks raise together or proceed together. On
a codec hash mismatch the ranks run one more all-gather of their spec strings
and raise `CodecMismatchError` naming every rank's spec. The descriptor is
also how receivers learn the sizes of variable-size payloads (``zstd``,
chains).

With ``Policy(verify=False)`` and a codec of fixed size
(``encoded_nbytes`` not None), no descriptor is exchanged: every rank
computes the packed sizes from shapes it already knows (`packed_size`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .. import watchdog, wire
from ..codec import Codec
from ..errors import CollectiveError
from ..wire.descriptor import (
    OP_CODES,
    Descriptor,
    DescriptorTable,
    frame,
    frame_capacity,
    read_frames,
    redop_code,
    spec_row,
)
from .comm import Comm
from .registry import algorithm_name

__all__ = [
    "Comm",
    "exchange",
    "describe",
    "inline",
    "reject",
    "packed_size",
    "alltoallv",
    "allgatherv",
    "alltoallv_start",
    "allgatherv_start",
    "wait_timed",
    "encode_pack",
    "encode_pack_many",
    "unpack_decode",
    "acc_dtype",
    "reduce_into",
    "chunk_bounds",
    "average",
    "gather_sizes",
    "broadcast_buf",
]


# --------------------------------------------------------------- descriptors
def _all_gather_flat(
    out: torch.Tensor, inp: torch.Tensor, group: Any, async_op: bool = False
) -> Any:
    # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(out, inp, group=group, async_op=True)
    if async_op:
        return work
    watchdog.wait(work, out.device)  # blocking: in slices that notice diverged ranks
    return None


def _gather_rows(
    comm: Comm, desc: Descriptor, payload: torch.Tensor | None = None
) -> tuple[list[list[int]], list[torch.Tensor | None]]:
    """The descriptor round: every rank's row, and the payloads that rode along.

    On CPU, one ``all_to_all_single`` of frames (`wire.descriptor.frame`): each rank
    sends its row, and ``payload`` when the frame fits `frame_capacity`, to every peer,
    and receives up to `frame_capacity` bytes from each. Every rank posts the same
    receive size whatever the others send, so ranks that disagree (another codec, size
    or op) never make gloo abort; they raise on the table. Elsewhere (NCCL wants equal
    sizes), and for the all-to-alls, one all-gather of the rows, and no payload rides
    along: a frame round of an all-to-all could meet a peer's plain ``all_to_all_single``
    of the same call (``auto`` decides all-to-alls by size, and a wrong program's ranks
    pass different sizes) and be taken for its data; an all-gather cannot, and the
    watchdog names the two calls.
    """
    world = comm.size
    words = desc.words(world)
    if comm.device.type != "cpu" or comm.op in ("all_to_all", "all_to_all_single"):
        row = torch.tensor(words, dtype=torch.int64, device=comm.device)
        out = torch.empty(world * row.numel(), dtype=torch.int64, device=comm.device)
        with comm.rec.phase("transfer"):
            _all_gather_flat(out, row, comm.group)
        comm.rec.bytes_wire += row.numel() * 8
        return out.reshape(world, row.numel()).tolist(), [None] * world
    fr = frame(words, world, payload)
    head = 8 * (len(words) + 1)
    mine = payload if fr.numel() > head else None
    cap = frame_capacity(world)
    out = torch.empty((world - 1) * cap, dtype=torch.uint8)
    ins = [0 if r == comm.rank else fr.numel() for r in range(world)]
    outs = [0 if r == comm.rank else cap for r in range(world)]
    send = fr if world == 2 else fr.repeat(world - 1)
    with comm.rec.phase("transfer"):
        work = dist.all_to_all_single(out, send, outs, ins, group=comm.group, async_op=True)
        watchdog.wait(work, comm.device)  # in slices that notice diverged ranks
    comm.rec.bytes_wire += fr.numel()  # like the all-gather it replaces: once
    got = read_frames(out, world, comm.rank, words, mine)
    return got.rows, got.payloads


def exchange(
    comm: Comm,
    *,
    algorithm: int,
    dtype: torch.dtype | None,
    numel: int,
    sizes: Sequence[int],
    redop: Any = None,
    root: int = -1,
    same_numel: bool = True,
    chunk: int = 0,
    payload: torch.Tensor | None = None,
) -> DescriptorTable:
    """Exchange this rank's descriptor with every rank's and check them against each other.

    ``algorithm`` is the wire code of the calling algorithm (`Algorithm.code`);
    ``chunk`` the elements per chunk of a call the chunked driver pipelines (0: none).
    ``payload``: this rank's packed buffer, the same for every destination (its size in
    ``sizes``), to send with the descriptor when it is small (`wire.descriptor.frame`);
    the table's ``payloads`` then hold every rank's that came (see `inline`).

    Raises, on every rank alike:
        CollectiveError: another rank rejected its arguments, or the ranks disagree on the
            op, algorithm, dtype, element count (when ``same_numel``), reduce op or root.
        CodecMismatchError: the ranks use different codec configs (names every spec).
    """
    desc = Descriptor(
        op=OP_CODES[comm.op],
        algorithm=algorithm,
        config_hash=comm.codec.config_hash,
        spec_nbytes=len(comm.codec.spec.encode()),
        dtype=dtype,
        numel=numel,
        redop=redop_code(redop),
        root=root,
        chunk=chunk,
        sizes=tuple(sizes),
    )
    rows, payloads = _gather_rows(comm, desc, payload)
    table = DescriptorTable.from_rows(rows, comm.op)
    table.check_status(functools.partial(watchdog.rejections, watchdog.group_name(comm.group)))
    if not table.same_codec():
        raise table.codec_mismatch(_gather_specs(comm, table), comm.rank)
    table.check_call(same_numel=same_numel, algorithm_name=algorithm_name)
    # Attached on every rank (a rank without a payload of its own may receive others'),
    # so that `inline` answers alike everywhere.
    return DescriptorTable(table.op, table.rows, table.uniform, tuple(payloads))


def inline(table: DescriptorTable, ranks: Sequence[int]) -> list[torch.Tensor] | None:
    """The payloads of ``ranks`` that came with their descriptors (each the size its row
    announces), or None if one did not: then move them in a round of their own. Every
    rank received the same frames, so every rank gets the same answer."""
    got = []
    for r in ranks:
        p = table.payloads[r] if table.payloads is not None else None
        if p is None or p.numel() != table.rows[r].sizes[0]:
            return None
        got.append(p)
    return got


def describe(
    comm: Comm, algorithm: int, x: torch.Tensor, sizes: Sequence[int], **fields: Any
) -> DescriptorTable:
    """`exchange` for a call whose input is ``x`` (its dtype and element count);
    ``fields``: the other descriptor fields (``redop``, ``root``, ``chunk``, ``payload``)."""
    return exchange(
        comm, algorithm=algorithm, dtype=x.dtype, numel=x.numel(), sizes=sizes, **fields
    )


def reject(comm: Comm, error: BaseException) -> None:
    """Tell the other ranks (through the descriptor) that this rank's arguments are bad.

    Use instead of `exchange` when a local check failed, then raise ``error``: the
    other ranks raise too instead of waiting for this one, naming this rank and
    ``error`` (published to the store first: `commpress.watchdog.tell_rejection`).
    """
    watchdog.tell_rejection(watchdog.group_name(comm.group), comm.rank, str(error))
    desc = Descriptor(
        op=OP_CODES[comm.op],
        algorithm=0,
        config_hash=comm.codec.config_hash,
        spec_nbytes=len(comm.codec.spec.encode()),
        dtype=None,
        numel=0,
        status=1,
    )
    _gather_rows(comm, desc)  # the other ranks read it; this one raises its own error


def _gather_specs(comm: Comm, table: DescriptorTable) -> list[str]:
    buf = spec_row(comm.codec.spec, table.longest_spec, comm.device)
    out = torch.empty(comm.size * buf.numel(), dtype=torch.uint8, device=comm.device)
    _all_gather_flat(out, buf, comm.group)
    return table.specs(out)


# -------------------------------------------------------------- wire sizes
@functools.lru_cache(maxsize=4096)
def _packed_size_cached(
    codec: Codec, shape: tuple[int, ...], dtype: torch.dtype, checksum: bool
) -> int:
    numel = 1
    for d in shape:
        numel *= d
    layout = codec.sections(numel, dtype)
    if layout is not None:
        return wire.layout_nbytes(codec.spec, shape, layout, checksum)
    packet = codec.encode(torch.zeros(shape, dtype=dtype))
    return wire.packed_nbytes(packet, checksum)


def packed_size(comm: Comm, shape: Sequence[int], dtype: torch.dtype) -> int:
    """Exact ``len(wire.pack(...))`` of a tensor of ``shape`` for a fixed-size codec.

    Computed once per (codec, shape, dtype) by encoding zeros on the CPU.
    """
    return _packed_size_cached(comm.codec, tuple(int(s) for s in shape), dtype, comm.checksum)


# ------------------------------------------------------------- encode/decode
def encode_pack(
    comm: Comm, x: torch.Tensor, out: torch.Tensor | None = None, roundtrip: bool = False
) -> torch.Tensor:
    """``wire.encode_pack(codec, x)`` (into ``out`` when given), timed as encode.

    ``roundtrip``: also overwrite ``x`` with what the receivers will decode.
    """
    with comm.rec.phase("encode"):
        return wire.encode_pack(comm.codec, x, checksum=comm.checksum, out=out, roundtrip=roundtrip)


def encode_pack_many(comm: Comm, pieces: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Encode each piece (None: an empty buffer) into one contiguous send buffer.

    For codecs of fixed size the packets are written straight into slices of one
    allocation, so `alltoallv_start` sends them without concatenating; otherwise each
    is packed on its own.
    """
    empty = torch.empty(0, dtype=torch.uint8, device=comm.device)
    fixed = comm.codec.sections(1, pieces_dtype(pieces)) is not None
    if not fixed:
        return [empty if p is None else encode_pack(comm, p) for p in pieces]
    sizes = [0 if p is None else packed_size(comm, p.shape, p.dtype) for p in pieces]
    send = torch.empty(sum(sizes), dtype=torch.uint8, device=comm.device)
    bufs = []
    pos = 0
    for p, n in zip(pieces, sizes, strict=True):
        bufs.append(empty if p is None else encode_pack(comm, p, out=send[pos : pos + n]))
        pos += n
    return bufs


def pieces_dtype(pieces: Sequence[torch.Tensor | None]) -> torch.dtype:
    for p in pieces:
        if p is not None:
            return p.dtype
    return torch.float32


def unpack_decode(
    comm: Comm,
    buf: torch.Tensor,
    numel: int | None = None,
    source: int | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Decode a received wire buffer, checking the codec and (if given) the element count.

    ``out``/``accumulate``: decode into ``out`` (or add to it) as `Codec.decode` does;
    an ``out`` of another dtype than the packet's takes a copy of the decoded tensor.

    Raises:
        CodecMismatchError: the buffer was made by another codec config.
        CollectiveError: it holds another number of elements than expected.
    """
    with comm.rec.phase("decode"):
        packet = wire.unpack(buf, comm.codec)
        if numel is not None and packet.meta.numel != numel:
            who = f" from rank {source}" if source is not None else ""
            raise comm.fail(
                f"received a tensor of {packet.meta.numel} elements "
                f"(shape {tuple(packet.meta.shape)}){who} where {numel} were expected; "
                "the ranks' tensor sizes do not match"
            )
        if out is not None and not accumulate and out.dtype != packet.meta.dtype:
            return out.copy_(comm.codec.decode(packet).view(out.shape))
        if out is not None and out.shape != packet.meta.shape:
            out = out.view(packet.meta.shape)
        return comm.codec.decode(packet, out=out, accumulate=accumulate)


# ----------------------------------------------------------------- transfers
def _timed(comm: Comm, fn: Any, *args: Any, **kwargs: Any) -> Any:
    with comm.rec.phase("transfer"):
        return fn(*args, **kwargs)


def alltoallv(
    comm: Comm, send: Sequence[torch.Tensor | None], recv_sizes: Sequence[int]
) -> list[torch.Tensor]:
    """Send ``send[j]`` (uint8 or None) to rank ``j``; receive ``recv_sizes[i]`` bytes from ``i``.

    One backend ``all_to_all_single`` over ``uint8`` with split sizes; every rank
    must know every size (from the descriptors), or the backend aborts.
    """
    work, parts = alltoallv_start(comm, send, recv_sizes, async_op=False)
    return parts


def alltoallv_start(
    comm: Comm,
    send: Sequence[torch.Tensor | None],
    recv_sizes: Sequence[int],
    async_op: bool = True,
) -> tuple[Any, list[torch.Tensor]]:
    """`alltoallv`, optionally posted asynchronously: returns ``(work, received parts)``.

    With ``async_op`` the parts are valid once ``work.wait()`` returned (see `wait_timed`).
    Only the bytes for other ranks count as wire bytes.
    """
    send_sizes = [0 if b is None else b.numel() for b in send]
    parts = [b for b in send if b is not None and b.numel()]
    inp = _concat(parts, comm.device)
    out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=comm.device)
    work = _timed(
        comm,
        dist.all_to_all_single,
        out,
        inp,
        list(recv_sizes),
        send_sizes,
        group=comm.group,
        async_op=True,
    )
    if not async_op:
        wait_timed(comm, work)
        work = None
    comm.rec.bytes_wire += inp.numel() - send_sizes[comm.rank]
    return work, list(torch.split(out, list(recv_sizes)))


def _concat(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``torch.cat(parts)``, or the span of one buffer when the parts are its adjacent
    slices in order (what `encode_pack_many` makes): no copy then."""
    if not parts:
        return torch.empty(0, dtype=torch.uint8, device=device)
    first = parts[0]
    end = first.data_ptr()
    for p in parts:
        if p.data_ptr() != end or p.untyped_storage().data_ptr() != (
            first.untyped_storage().data_ptr()
        ):
            return torch.cat(parts)
        end += p.numel()
    total = end - first.data_ptr()
    return first.as_strided((total,), (1,))


def wait_timed(comm: Comm, work: Any) -> None:
    """Wait for an async backend op, counting the wait as transfer time."""
    if work is not None:
        _timed(comm, watchdog.wait, work, comm.device)


def allgatherv(comm: Comm, buf: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """All-gather one uint8 buffer per rank, of the given (possibly different) sizes.

    Equal sizes: one ``all_gather_into_tensor``. Different sizes: each buffer is
    padded to the largest (the padding is sliced off on arrival).
    """
    work, parts = allgatherv_start(comm, buf, sizes, async_op=False)
    return parts


def allgatherv_start(
    comm: Comm, buf: torch.Tensor, sizes: Sequence[int], async_op: bool = True
) -> tuple[Any, list[torch.Tensor]]:
    """`allgatherv`, optionally posted asynchronously: returns ``(work, parts)``."""
    longest = max(sizes)
    if buf.numel() < longest:
        padded = torch.zeros(longest, dtype=torch.uint8, device=comm.device)
        padded[: buf.numel()] = buf
        buf = padded
    out = torch.empty(comm.size * longest, dtype=torch.uint8, device=comm.device)
    work = _timed(comm, _all_gather_flat, out, buf, comm.group, async_op)
    comm.rec.bytes_wire += longest
    return work, [out[r * longest : r * longest + sizes[r]] for r in range(comm.size)]


def broadcast_buf(comm: Comm, buf: torch.Tensor | None, size: int, root: int) -> torch.Tensor:
    """Broadcast ``size`` bytes from group rank ``root`` (whose ``buf`` it is)."""
    if comm.rank != root:
        buf = torch.empty(size, dtype=torch.uint8, device=comm.device)
    elif buf is None or buf.numel() != size:
        # Only possible with verify=False if a codec's encoded_nbytes is wrong; sending a
        # buffer of another size than the receivers expect would abort gloo.
        raise comm.fail(
            f"the packed buffer has {0 if buf is None else buf.numel()} bytes where {size} were "
            f"announced; codec {comm.codec.spec!r} does not have the fixed size it declares"
        )
    work = _timed(comm, dist.broadcast, buf, comm.global_rank(root), comm.group, True)
    wait_timed(comm, work)
    comm.rec.bytes_wire += size
    return buf


# ----------------------------------------------------------------- reducing
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for 16-bit floats, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def reduce_into(acc: torch.Tensor, x: torch.Tensor, op: Any) -> None:
    """``acc = op(acc, x)`` in place, for every ``ReduceOp`` commpress reduces itself."""
    R = dist.ReduceOp
    if acc.dtype == torch.bool:
        if op in (R.SUM, R.MAX, R.BOR):
            acc.logical_or_(x)
        elif op in (R.PRODUCT, R.MIN, R.BAND):
            acc.logical_and_(x)
        elif op == R.BXOR:
            acc.logical_xor_(x)
        else:
            raise CollectiveError(f"reduce op {op} is not supported for bool tensors")
        return
    if op in (R.SUM, R.AVG):
        acc.add_(x)
    elif op == R.MIN:
        torch.minimum(acc, x, out=acc)
    elif op == R.MAX:
        torch.maximum(acc, x, out=acc)
    elif op == R.PRODUCT:
        acc.mul_(x)
    elif op == R.BAND:
        acc.bitwise_and_(x)
    elif op == R.BOR:
        acc.bitwise_or_(x)
    elif op == R.BXOR:
        acc.bitwise_xor_(x)
    else:
        raise CollectiveError(f"reduce op {op} cannot be computed by commpress")


def chunk_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` ranges covering ``numel``; the first
    ``numel % parts`` are one element longer."""
    base, extra = divmod(numel, parts)
    bounds = []
    start = 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def gather_sizes(comm: Comm, nbytes: int) -> list[int]:
    """All-gather one byte count per rank (the second round of a variable-size two-phase)."""
    row = torch.tensor([nbytes], dtype=torch.int64, device=comm.device)
    out = torch.empty(comm.size, dtype=torch.int64, device=comm.device)
    _timed(comm, _all_gather_flat, out, row, comm.group)
    comm.rec.bytes_wire += 8
    return out.tolist()


def average(t: torch.Tensor, op: Any, world: int) -> torch.Tensor:
    """``t`` divided in place by ``world`` for ``ReduceOp.AVG`` (a sum otherwise): the
    one place AVG becomes a division. ``t`` must be the caller's own result buffer."""
    if op == dist.ReduceOp.AVG:
        t.div_(world)
    return t
