"""Transport ops: encode once, move packed buffers, decode on arrival.

broadcast, all_gather, gather, scatter, all_to_all and send/recv move data
without reducing it. Each piece of data is encoded once by its sender and
decoded by its receivers. A rank's *own* piece is decoded too (all_gather,
gather, all_to_all, scatter, and the source of broadcast): the outputs are
then the same on every rank that holds them, whichever rank one looks at.

Sizes: the descriptor exchange (`common.exchange`) tells every rank how
many bytes each peer sends it; with ``verify=False`` and a fixed-size codec
they are computed from the shapes the receiver already knows. Variable-size
all_gather pads to the largest buffer; gather, scatter and all_to_all move
exact sizes with one ``all_to_all_single`` over ``uint8``.

Point-to-point
--------------
A send is two messages to the destination: a fixed-size ``int64``
descriptor on the caller's tag, then the packed buffer on a private tag
(``P2P_TAG_BASE`` plus a per-destination sequence number that the
descriptor carries). The descriptor shares the caller's tag so it stays in
order with uncompressed messages on that tag; the private payload tag lets
the receiver post the payload receive whenever the descriptor has arrived,
in any order, without stealing another message. gloo completes a send only
once the receiver has posted the matching receive, so `irecv` posts the
payload receive from a helper thread as soon as the descriptor arrives.

A codec mismatch is detected by the receiver, which still drains the payload
(so the sender completes and the channel stays usable) and then raises
`CodecMismatchError` naming both specs. The sender is not told: a send is
one-way (a round trip would double its latency).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..codec import CODE_DTYPES, DTYPE_CODES
from .common import (
    MAGIC,
    Comm,
    allgatherv,
    alltoallv,
    broadcast_buf,
    encode_pack,
    exchange,
    packed_size,
    signed64,
    unpack_decode,
)

__all__ = [
    "broadcast",
    "all_gather",
    "gather",
    "scatter",
    "all_to_all",
    "isend",
    "post_recv",
    "complete_recv",
    "P2P_TAG_BASE",
]

#: Tags at and above this carry commpress payloads; keep your own tags below it.
P2P_TAG_BASE = 1 << 30
_SEQ_SPAN = 1 << 24


def _decode_into(comm: Comm, buf: torch.Tensor, out: torch.Tensor, source: int) -> None:
    out.copy_(unpack_decode(comm, buf, out.numel(), source).view(out.shape))


def _encode(comm: Comm, t: torch.Tensor) -> torch.Tensor:
    # Always 1-D on the wire: the receiver's output shape decides the shape, so a
    # (6,) input may land in a (2, 3) output like with torch, and sizes of fixed-size
    # codecs follow from element counts alone.
    return encode_pack(comm, t.reshape(-1))


def _size(comm: Comm, t: torch.Tensor) -> int:
    return packed_size(comm, (t.numel(),), t.dtype)


def broadcast(comm: Comm, tensor: torch.Tensor, root: int) -> None:
    """Broadcast ``tensor`` from group rank ``root`` in place (the root's copy is decoded too)."""
    buf = _encode(comm, tensor) if comm.rank == root else None
    if comm.verify:
        d = exchange(
            comm,
            algorithm="transport",
            dtype=tensor.dtype,
            numel=tensor.numel(),
            sizes=[buf.numel() if buf is not None else 0] * comm.size,
            root=root,
        )
        size = d.sizes_from(root)[0]
    else:
        size = _size(comm, tensor)
    buf = broadcast_buf(comm, buf, size, root)
    _decode_into(comm, buf, tensor, root)


def all_gather(comm: Comm, tensor: torch.Tensor, outputs: Sequence[torch.Tensor]) -> None:
    """Every rank's ``tensor`` into ``outputs[rank]`` on every rank (shapes may differ by rank)."""
    buf = _encode(comm, tensor)
    if comm.verify:
        d = exchange(
            comm,
            algorithm="transport",
            dtype=tensor.dtype,
            numel=tensor.numel(),
            sizes=[buf.numel()] * comm.size,
            same_numel=False,
        )
        sizes = [d.sizes_from(r)[0] for r in range(comm.size)]
    else:
        sizes = [_size(comm, o) for o in outputs]
    parts = allgatherv(comm, buf, sizes)
    for r, (part, out) in enumerate(zip(parts, outputs, strict=True)):
        _decode_into(comm, part, out, r)


def gather(
    comm: Comm, tensor: torch.Tensor, outputs: Sequence[torch.Tensor] | None, root: int
) -> None:
    """Every rank's ``tensor`` into ``outputs`` on group rank ``root``."""
    buf = _encode(comm, tensor)
    if comm.verify:
        d = exchange(
            comm,
            algorithm="transport",
            dtype=tensor.dtype,
            numel=tensor.numel(),
            sizes=[buf.numel()] * comm.size,
            root=root,
        )
        sizes = [d.sizes_from(r)[0] for r in range(comm.size)]
    else:
        sizes = [_size(comm, tensor)] * comm.size
    send: list[torch.Tensor | None] = [None] * comm.size
    send[root] = buf
    parts = alltoallv(comm, send, sizes if comm.rank == root else [0] * comm.size)
    if comm.rank == root:
        assert outputs is not None  # checked by the caller
        for r, (part, out) in enumerate(zip(parts, outputs, strict=True)):
            _decode_into(comm, part, out, r)


def scatter(
    comm: Comm, tensor: torch.Tensor, inputs: Sequence[torch.Tensor] | None, root: int
) -> None:
    """``inputs[r]`` of group rank ``root`` into ``tensor`` of rank ``r``."""
    if comm.rank == root:
        assert inputs is not None  # checked by the caller
        bufs: list[torch.Tensor | None] = [_encode(comm, t) for t in inputs]
    else:
        bufs = [None] * comm.size
    if comm.verify:
        d = exchange(
            comm,
            algorithm="transport",
            dtype=tensor.dtype,
            numel=tensor.numel(),
            sizes=[0 if b is None else b.numel() for b in bufs],
            root=root,
        )
        size = d.sizes_from(root)[comm.rank]
    else:
        size = _size(comm, tensor)
    recv = [0] * comm.size
    recv[root] = size
    parts = alltoallv(comm, bufs, recv)
    _decode_into(comm, parts[root], tensor, root)


def all_to_all(
    comm: Comm, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], min_bytes: int
) -> bool:
    """``inputs[j]`` of rank ``i`` into ``outputs[i]`` of rank ``j``.

    Returns False, having sent nothing, when every rank's input is smaller than
    ``min_bytes`` (known only after the descriptor exchange): the caller then runs
    the plain collective.
    """
    bufs = [_encode(comm, t) for t in inputs]
    numel = sum(t.numel() for t in inputs)
    if comm.verify:
        dtype = inputs[0].dtype if inputs else None
        d = exchange(
            comm,
            algorithm="transport",
            dtype=dtype,
            numel=numel,
            sizes=[b.numel() for b in bufs],
            same_numel=False,
        )
        itemsize = inputs[0].element_size() if inputs else 1
        if max(d.numel(r) for r in range(comm.size)) * itemsize < min_bytes:
            return False
        sizes = d.sizes_to(comm.rank)
    else:
        sizes = [_size(comm, o) for o in outputs]
    parts = alltoallv(comm, bufs, sizes)
    for r, (part, out) in enumerate(zip(parts, outputs, strict=True)):
        _decode_into(comm, part, out, r)
    return True


# ------------------------------------------------------------- point-to-point
_P2P_WORDS = 8
_seq_lock = threading.Lock()
_seq: dict[tuple[str, int], itertools.count] = {}


def _next_tag(group_key: str, dst: int) -> int:
    with _seq_lock:
        counter = _seq.setdefault((group_key, dst), itertools.count())
        return P2P_TAG_BASE + next(counter) % _SEQ_SPAN


def isend(comm: Comm, tensor: torch.Tensor, dst: int, tag: int, group_key: str) -> list[Any]:
    """Post the messages of a compressed send to group rank ``dst``; returns the backend works.

    The caller must keep the works (and so the buffers) alive until they complete.
    """
    buf = _encode(comm, tensor)
    peer = comm.global_rank(dst)
    comm.rec.bytes_wire += buf.numel()
    if not comm.verify:
        return [dist.isend(buf, peer, group=comm.group, tag=tag), buf]
    payload_tag = _next_tag(group_key, dst)
    desc = torch.tensor(
        [
            MAGIC,
            signed64(comm.codec.config_hash),
            len(comm.codec.spec.encode()),
            DTYPE_CODES.get(tensor.dtype, 0),
            tensor.numel(),
            buf.numel(),
            payload_tag,
            0,
        ],
        dtype=torch.int64,
        device=comm.device,
    )
    comm.rec.bytes_wire += desc.numel() * 8
    works = [
        dist.isend(desc, peer, group=comm.group, tag=tag),
        dist.isend(buf, peer, group=comm.group, tag=payload_tag),
    ]
    return [*works, desc, buf]


@dataclass
class PendingRecv:
    """A posted compressed receive: the first message's work and buffer."""

    comm: Comm
    tensor: torch.Tensor
    src: int | None  # group rank, None for any source
    work: Any
    buf: torch.Tensor


def post_recv(comm: Comm, tensor: torch.Tensor, src: int | None, tag: int) -> PendingRecv:
    """Post the first receive of a compressed recv (the descriptor, or the payload with
    ``verify=False``) on the caller's thread, in issue order."""
    if comm.verify:
        buf = torch.empty(_P2P_WORDS, dtype=torch.int64, device=comm.device)
    else:
        buf = torch.empty(_size(comm, tensor), dtype=torch.uint8, device=comm.device)
    peer = None if src is None else comm.global_rank(src)
    work = dist.irecv(buf, peer, group=comm.group, tag=tag)
    return PendingRecv(comm, tensor, src, work, buf)


def complete_recv(p: PendingRecv) -> int:
    """Wait for a posted receive, fetch the payload, decode into the tensor; returns the
    sender's group rank."""
    comm = p.comm
    p.work.wait()
    src = p.src if p.src is not None else int(p.work._source_rank())
    if not comm.verify:
        _decode_into(comm, p.buf, p.tensor, src)
        comm.rec.bytes_wire += p.buf.numel()
        return src
    magic, _hash, _spec_len, dcode, numel, nbytes, payload_tag, _ = p.buf.tolist()
    if magic != MAGIC:
        raise comm.fail(
            f"the message from rank {src} is not a commpress descriptor (mixed "
            "compressed and plain sends on one tag, or mixed commpress versions)"
        )
    expected_bytes = p.tensor.numel() * p.tensor.element_size()
    if not 0 <= nbytes <= 4 * expected_bytes + (1 << 20) or payload_tag < P2P_TAG_BASE:
        raise comm.fail(
            f"rank {src} announced an implausible payload of {nbytes} bytes "
            f"for a tensor of {expected_bytes} bytes"
        )
    payload = torch.empty(nbytes, dtype=torch.uint8, device=comm.device)
    dist.recv(payload, comm.global_rank(src), group=comm.group, tag=payload_tag)
    comm.rec.bytes_wire += nbytes + p.buf.numel() * 8
    if numel != p.tensor.numel() or CODE_DTYPES.get(dcode) != p.tensor.dtype:
        raise comm.fail(
            f"rank {src} sent {numel} elements of {CODE_DTYPES.get(dcode)} but this rank receives "
            f"into {p.tensor.numel()} elements of {p.tensor.dtype}"
        )
    _decode_into(comm, payload, p.tensor, src)
    return src
