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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..codec import Codec, Packet
from .common import Comm, acc_dtype, describe, wait_timed
from .registry import Algorithm, CodecSpeed, Link, Stage, register_algorithm

__all__ = ["Direct", "Prepared", "prepare", "all_reduce", "stages", "reduce"]


@dataclass
class Prepared:
    """The encoded (pre-scaled) input of one rank, ready for the transfer."""

    flat: torch.Tensor
    packet: Packet


def prepare(comm: Comm, flat: torch.Tensor) -> Prepared:
    """Encode ``flat / world`` (compensated under error feedback); local work only."""
    return Prepared(flat, _encode_scaled(comm, flat))


def _encode_scaled(comm: Comm, flat: torch.Tensor) -> Packet:
    x = flat if comm.feedback is None else comm.feedback.compensate(flat, comm.key)
    x = x.to(acc_dtype(flat.dtype))
    with comm.rec.phase("encode"):
        scaled = x / comm.size if comm.codec.prescale else x
        packet = comm.codec.encode(scaled)
        # The backend sums in place: never let it write into a view of the input.
        payload = tuple(
            p.clone() if p.data_ptr() in (scaled.data_ptr(), flat.data_ptr()) else p
            for p in packet.payload
        )
        packet = Packet(payload, packet.meta)
        if comm.feedback is not None:
            own = comm.codec.decode(packet).to(x.dtype)
            comm.feedback.update(comm.key, x, own * comm.size if comm.codec.prescale else own)
    return packet


def _describe(comm: Comm, flat: torch.Tensor, packet: Packet, op: Any, root: int) -> None:
    if comm.verify:
        describe(comm, Direct.code, flat, [packet.nbytes] * comm.size, redop=op, root=root)


def _finish(
    comm: Comm, packet: Packet, average: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode the summed packet (into ``out`` if given) and undo or apply the scaling."""
    with comm.rec.phase("decode"):
        if out is None:
            out = comm.codec.decode(packet)
        else:
            comm.codec.decode(packet, out=out)
        if comm.codec.prescale and not average:
            out.mul_(comm.size)
        elif not comm.codec.prescale and average:
            out.div_(comm.size)
    return out


def _reduce_payload(comm: Comm, flat: torch.Tensor, packet: Packet, op: Any, root: int) -> None:
    """Describe the call, then let the backend sum every section (into ``root``, or
    on every rank for ``root`` -1)."""
    _describe(comm, flat, packet, op, root)
    with comm.rec.phase("transfer"):
        for section in packet.payload:
            if root < 0:
                dist.all_reduce(section, group=comm.group)
            else:
                dist.reduce(section, comm.global_rank(root), group=comm.group)
            comm.rec.bytes_wire += section.numel() * section.element_size()


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
    _reduce_payload(comm, flat, packet, op, -1)
    return _finish(comm, packet, op == dist.ReduceOp.AVG, out)


def reduce(
    comm: Comm, flat: torch.Tensor, op: Any, root: int, prepared: Prepared | None = None
) -> torch.Tensor | None:
    """Like `all_reduce`, but only group rank ``root`` gets (and returns) the result."""
    packet = (prepared or prepare(comm, flat)).packet
    _reduce_payload(comm, flat, packet, op, root)
    if comm.rank != root:
        return None
    return _finish(comm, packet, op == dist.ReduceOp.AVG)


def stages(
    comms: Sequence[Comm],
    flat: torch.Tensor,
    op: Any,
    bounds: Sequence[tuple[int, int]],
    out: torch.Tensor,
) -> list[Stage] | None:
    """The chunked all-reduce's two stages: each chunk's backend all-reduce is in
    flight while the next chunk is encoded and the previous one decoded.

    One descriptor exchange covers the call (``comms[0]``, run here, before the
    first stage); ``out`` is the 1-D result in the accumulation dtype.
    """
    if not comms[0].codec.fixed_size:
        return None  # every rank must know the payload sizes without an exchange
    first = comms[0]
    if first.verify:
        chunk = bounds[0][1] - bounds[0][0]
        describe(first, Direct.code, flat, [0] * first.size, redop=op, chunk=chunk)
    average = op == dist.ReduceOp.AVG

    def post(k: int, _: Any) -> tuple[Packet, list[Any]]:
        a, b = bounds[k]
        packet = _encode_scaled(comms[k], flat[a:b])
        works = []
        for section in packet.payload:
            works.append(dist.all_reduce(section, group=comms[k].group, async_op=True))
            comms[k].rec.bytes_wire += section.numel() * section.element_size()
        return packet, works

    def finish(k: int, posted: tuple[Packet, list[Any]]) -> None:
        packet, works = posted
        for w in works:
            wait_timed(comms[k], w)
        a, b = bounds[k]
        _finish(comms[k], packet, average, out[a:b])

    return [(0, post), (1, finish)]


@register_algorithm
class Direct(Algorithm):
    """The backend sums the payload of a summable codec (fp16/bf16); module docstring."""

    name = "direct"
    code = 1
    auto_order = 0
    in_place = True

    def eligible(self, codec: Codec, sum_like: bool) -> str | None:
        if codec.summable and sum_like:
            return None
        return "needs a summable codec (fp16, bf16) and SUM/AVG"

    def cost(
        self, nbytes: int, world: int, link: Link, speed: CodecSpeed, family: str = "all_reduce"
    ) -> float:
        """``S/enc + 2 (N-1)/N * S/r / B + 2 (N-1) alpha + S/dec`` (a ring all-reduce)."""
        wire = 2 * (world - 1) / world * nbytes / speed.ratio
        return (
            nbytes / speed.encode_Bps
            + link.seconds(wire, 2 * (world - 1))
            + nbytes / speed.decode_Bps
        )

    all_reduce = staticmethod(all_reduce)
    reduce = staticmethod(reduce)
    prepare = staticmethod(prepare)
    stages = staticmethod(stages)
