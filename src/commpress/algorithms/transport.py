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

The descriptor's format is `commpress.wire.p2p`. A codec mismatch is detected
by the receiver from the descriptor's config hash and spec length; it still
drains the payload (so the sender completes and the channel stays usable) and
then raises `CodecMismatchError` naming both specs (the sender's is read from
the payload's header). The sender is not told: a send is one-way (a round trip
would double its latency).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import WireError
from ..wire.p2p import P2PDescriptor
from .common import (
    Comm,
    allgatherv,
    alltoallv,
    broadcast_buf,
    describe,
    encode_pack,
    exchange,
    inline,
    packed_size,
    unpack_decode,
)
from .registry import Algorithm, CodecSpeed, Link, register_algorithm

__all__ = [
    "Transport",
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


@register_algorithm
class Transport(Algorithm):
    """The ops that move data: encode once, move packets, decode on arrival."""

    name = "transport"
    code = 4
    families = frozenset({"all_gather", "broadcast", "gather", "scatter", "all_to_all", "p2p"})
    auto_order = 0

    def cost(
        self, nbytes: int, world: int, link: Link, speed: CodecSpeed, family: str = "all_reduce"
    ) -> float:
        """An all-gather's: ``S/enc + (N-1) S/r / B + (N-1) alpha + N S/dec``; a broadcast
        decodes once (``S/dec``), on every rank at once."""
        decodes = 1 if family == "broadcast" else world
        return (
            nbytes / speed.encode_Bps
            + link.seconds((world - 1) * nbytes / speed.ratio, world - 1)
            + decodes * nbytes / speed.decode_Bps
        )


def _decode_into(comm: Comm, buf: torch.Tensor, out: torch.Tensor, source: int) -> None:
    if out.is_contiguous():  # straight into the output: no temporary, no copy
        unpack_decode(comm, buf, out.numel(), source, out=out)
    else:
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
    if comm.verify:  # a small packet rides with the root's descriptor: one round
        d = describe(
            comm,
            Transport.code,
            tensor,
            [buf.numel() if buf is not None else 0] * comm.size,
            root=root,
            payload=buf,
        )
        came = inline(d, [root])
        buf = came[0] if came else broadcast_buf(comm, buf, d.sizes_from(root)[0], root)
    else:
        buf = broadcast_buf(comm, buf, _size(comm, tensor), root)
    _decode_into(comm, buf, tensor, root)


def all_gather(comm: Comm, tensor: torch.Tensor, outputs: Sequence[torch.Tensor]) -> None:
    """Every rank's ``tensor`` into ``outputs[rank]`` on every rank (shapes may differ by rank)."""
    buf = _encode(comm, tensor)
    if comm.verify:  # small packets ride with the descriptors: one round
        d = describe(
            comm, Transport.code, tensor, [buf.numel()] * comm.size, same_numel=False, payload=buf
        )
        parts = inline(d, range(comm.size)) or allgatherv(comm, buf, d.first_sizes())
    else:
        parts = allgatherv(comm, buf, [_size(comm, o) for o in outputs])
    for r, (part, out) in enumerate(zip(parts, outputs, strict=True)):
        _decode_into(comm, part, out, r)


def gather(
    comm: Comm, tensor: torch.Tensor, outputs: Sequence[torch.Tensor] | None, root: int
) -> None:
    """Every rank's ``tensor`` into ``outputs`` on group rank ``root``."""
    buf = _encode(comm, tensor)
    if comm.verify:
        d = describe(comm, Transport.code, tensor, [buf.numel()] * comm.size, root=root)
        sizes = d.first_sizes()
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
        d = describe(
            comm, Transport.code, tensor, [0 if b is None else b.numel() for b in bufs], root=root
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
            algorithm=Transport.code,
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
    desc = P2PDescriptor.for_send(comm.codec, tensor, buf.numel(), payload_tag).to_tensor(
        comm.device
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
        buf = P2PDescriptor.empty(comm.device)
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
    try:
        desc = P2PDescriptor.from_tensor(p.buf)
    except WireError as exc:
        raise comm.fail(f"the message from rank {src}: {exc}") from None
    expected_bytes = p.tensor.numel() * p.tensor.element_size()
    if desc.nbytes > 4 * expected_bytes + (1 << 20) or desc.payload_tag < P2P_TAG_BASE:
        raise comm.fail(
            f"rank {src} announced an implausible payload of {desc.nbytes} bytes "
            f"for a tensor of {expected_bytes} bytes"
        )
    payload = torch.empty(desc.nbytes, dtype=torch.uint8, device=comm.device)
    dist.recv(payload, comm.global_rank(src), group=comm.group, tag=desc.payload_tag)
    comm.rec.bytes_wire += desc.nbytes + p.buf.numel() * 8
    desc.check_codec(comm.codec, payload, src)
    if desc.numel != p.tensor.numel() or desc.dtype != p.tensor.dtype:
        raise comm.fail(
            f"rank {src} sent {desc.numel} elements of {desc.dtype} but this rank receives "
            f"into {p.tensor.numel()} elements of {p.tensor.dtype}"
        )
    _decode_into(comm, payload, p.tensor, src)
    return src
