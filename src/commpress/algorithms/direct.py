"""``direct`` all-reduce/reduce: the backend sums the payload of a summable codec.

For ``fp16``/``bf16`` (``Codec.summable``) the payload is a plain tensor the
backend can add, so the whole all-reduce is one backend all-reduce of the
cast tensor: no decode/re-encode hop, half the bytes of float32.

Pre-scaling and overflow. With ``fp16`` each rank encodes ``x / world_size``
(what torch's ``fp16_compress_hook`` does), so the backend sums numbers whose
total is the *mean*: for ``AVG`` that is the result, for ``SUM`` it is
multiplied back by ``world_size`` after decoding, in the accumulation dtype
(float32 for 16-bit inputs). ``bf16`` has float32's range and skips the
pre-scaling (its codec declares ``prescale = False``): AVG divides after the
decode. With ``fp16`` (largest finite 65504):

- an element overflows to +-Inf only when a partial sum of the scaled values
  exceeds 65504, i.e. when the mean (or a rank's ``x / world_size``) is
  beyond it; a SUM whose ranks each hold up to ``65504`` no longer overflows;
- scaled values below ``2**-24`` flush to zero (the price of pre-scaling:
  tiny gradients lose ``log2(world_size)`` bits of subnormal range);
- the backend adds in the wire dtype, so each of the ``world_size - 1``
  additions rounds to fp16/bf16 precision (the tests bound this).

``bf16`` has float32's range and cannot overflow where float32 does not.
NaN and Inf propagate like in a plain all-reduce.

Every rank ends bit-identical: the backend's sum is the same everywhere and
the decode is deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..codec import Packet
from .common import Comm, acc_dtype, exchange, wait_timed

__all__ = ["Prepared", "prepare", "all_reduce", "all_reduce_pipelined", "reduce"]


@dataclass
class Prepared:
    """The encoded (pre-scaled) input of one rank, ready for the transfer."""

    flat: torch.Tensor
    packet: Packet


def prepare(comm: Comm, flat: torch.Tensor) -> Prepared:
    """Encode ``flat / world`` (compensated under error feedback); local work only."""
    return Prepared(flat, _encode_scaled(comm, flat))


def _prescale(comm: Comm) -> bool:
    # Only narrow-range casts (fp16) need it; bf16 has float32's range.
    return getattr(comm.codec, "prescale", True)


def _encode_scaled(comm: Comm, flat: torch.Tensor) -> Packet:
    x = flat if comm.feedback is None else comm.feedback.compensate(flat, comm.key)
    x = x.to(acc_dtype(flat.dtype))
    t0 = time.perf_counter()
    scaled = x / comm.size if _prescale(comm) else x
    packet = comm.codec.encode(scaled)
    # The backend sums in place: never let it write into a view of the input.
    payload = tuple(
        p.clone() if p.data_ptr() == scaled.data_ptr() or p.data_ptr() == flat.data_ptr() else p
        for p in packet.payload
    )
    packet = Packet(payload, packet.meta)
    if comm.feedback is not None:
        own = comm.codec.decode(packet).to(x.dtype)
        comm.feedback.update(comm.key, x, own * comm.size if _prescale(comm) else own)
    comm.rec.encode_s += time.perf_counter() - t0
    return packet


def _describe(comm: Comm, flat: torch.Tensor, packet: Packet, op: Any, root: int) -> None:
    if comm.verify:
        exchange(
            comm,
            algorithm="direct",
            dtype=flat.dtype,
            numel=flat.numel(),
            sizes=[packet.nbytes] * comm.size,
            redop=op,
            root=root,
        )


def _finish(
    comm: Comm, packet: Packet, average: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode the summed packet (into ``out`` if given) and undo or apply the scaling."""
    t0 = time.perf_counter()
    if out is None:
        out = comm.codec.decode(packet)
    else:
        comm.codec.decode(packet, out=out)
    if _prescale(comm) and not average:
        out.mul_(comm.size)
    elif not _prescale(comm) and average:
        out.div_(comm.size)
    comm.rec.decode_s += time.perf_counter() - t0
    return out


def all_reduce(
    comm: Comm,
    flat: torch.Tensor,
    op: Any,
    prepared: Prepared | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum (``op`` SUM) or average (AVG) the 1-D ``flat`` over the group.

    Returns the result in the accumulation dtype (same on every rank), in ``out``
    when given (which may be ``flat`` itself: it was encoded before it is written).
    ``prepared``: `prepare`'s output when the encode already ran (pipelining).
    """
    packet = (prepared or prepare(comm, flat)).packet
    _describe(comm, flat, packet, op, -1)
    t0 = time.perf_counter()
    for section in packet.payload:
        dist.all_reduce(section, group=comm.group)
        comm.rec.bytes_wire += section.numel() * section.element_size()
    comm.rec.transfer_s += time.perf_counter() - t0
    return _finish(comm, packet, op == dist.ReduceOp.AVG, out)


def reduce(
    comm: Comm, flat: torch.Tensor, op: Any, root: int, prepared: Prepared | None = None
) -> torch.Tensor | None:
    """Like `all_reduce`, but only group rank ``root`` gets (and returns) the result."""
    packet = (prepared or prepare(comm, flat)).packet
    _describe(comm, flat, packet, op, root)
    t0 = time.perf_counter()
    for section in packet.payload:
        dist.reduce(section, comm.global_rank(root), group=comm.group)
        comm.rec.bytes_wire += section.numel() * section.element_size()
    comm.rec.transfer_s += time.perf_counter() - t0
    if comm.rank != root:
        return None
    return _finish(comm, packet, op == dist.ReduceOp.AVG)


def all_reduce_pipelined(
    comms: Sequence[Comm],
    flat: torch.Tensor,
    op: Any,
    bounds: Sequence[tuple[int, int]],
    out: torch.Tensor,
) -> None:
    """Chunked `all_reduce` with each chunk's backend all-reduce in flight while the
    next chunk is encoded and the previous one decoded (same order on every rank).

    One descriptor exchange covers the call (``comms[0]``); ``out`` is the 1-D result
    in the accumulation dtype.
    """
    first = comms[0]
    if first.verify:
        exchange(
            first,
            algorithm="direct",
            dtype=flat.dtype,
            numel=flat.numel(),
            sizes=[0] * first.size,
            redop=op,
        )
    average = op == dist.ReduceOp.AVG
    pending: list[tuple[int, Packet, list[Any]]] = []

    def drain(upto: int) -> None:
        while len(pending) > upto:
            k, packet, works = pending.pop(0)
            for w in works:
                wait_timed(comms[k], w)
            a, b = bounds[k]
            _finish(comms[k], packet, average, out[a:b])

    for k, (a, b) in enumerate(bounds):
        packet = _encode_scaled(comms[k], flat[a:b])
        works = []
        for section in packet.payload:
            works.append(dist.all_reduce(section, group=comms[k].group, async_op=True))
            comms[k].rec.bytes_wire += section.numel() * section.element_size()
        pending.append((k, packet, works))
        drain(1)
    drain(0)
