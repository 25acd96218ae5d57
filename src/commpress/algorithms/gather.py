"""``gather`` all-reduce/reduce: every rank's packet to every rank, reduced locally.

Each rank encodes its whole tensor once; the packets are all-gathered (or,
for ``reduce``, sent to the root), decoded, and reduced in rank order
``0, 1, ..., world-1`` in the accumulation dtype (float32 for 16-bit
floats). Every rank reduces the same packets in the same order with the
same kernels, so all ranks end bit-identical -- including the contribution
of the rank itself, which is taken from its decoded packet, not from its raw
input.

One round and one quantization error per input (``two_phase`` has two
rounds and re-quantizes the sum), but each rank receives ``world - 1``
whole packets: for small tensors and small worlds, where latency dominates.
Exact reduce ops (MIN, MAX, PRODUCT, bitwise) run here too with lossless
codecs. SUM and AVG decode-and-add into the accumulator in rank order
(`Codec.decode` with ``accumulate``: as ``acc += decode(packet)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .common import (
    Comm,
    acc_dtype,
    allgatherv,
    alltoallv,
    average,
    describe,
    encode_pack,
    inline,
    packed_size,
    reduce_into,
    unpack_decode,
)
from .registry import Algorithm, CodecSpeed, Link, register_algorithm

if TYPE_CHECKING:
    from ..codec import Codec

__all__ = ["Gather", "Prepared", "prepare", "all_reduce", "reduce"]

_SUMS = (dist.ReduceOp.SUM, dist.ReduceOp.AVG)


@dataclass
class Prepared:
    """One rank's encoded input: ``x`` (input, compensated under error feedback) and its buffer."""

    x: torch.Tensor
    buf: torch.Tensor


def prepare(comm: Comm, flat: torch.Tensor) -> Prepared:
    """Encode this rank's input (plus its residual under error feedback); local work only."""
    x = flat if comm.feedback is None else comm.feedback.compensate(flat, comm.key)
    return Prepared(x, encode_pack(comm, x))


def _sizes(
    comm: Comm, flat: torch.Tensor, x: torch.Tensor, buf: torch.Tensor, op: Any, root: int
) -> list[int]:
    if comm.verify:
        d = describe(comm, Gather.code, flat, [buf.numel()] * comm.size, redop=op, root=root)
        return d.first_sizes()
    return [packed_size(comm, x.shape, x.dtype)] * comm.size


def _reduce(
    comm: Comm,
    flat: torch.Tensor,
    x: torch.Tensor,
    bufs: list[torch.Tensor],
    op: Any,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    adt = acc_dtype(flat.dtype)
    if comm.feedback is None and op in _SUMS and adt.is_floating_point:
        # Decode-and-add in rank order, straight into the result (``out``, which may be
        # ``flat``: it was encoded already) or a new accumulator: no temporaries.
        acc = out if out is not None else torch.empty(flat.numel(), dtype=adt, device=flat.device)
        for r, b in enumerate(bufs):
            unpack_decode(comm, b, flat.numel(), r, out=acc, accumulate=r > 0)
        return average(acc, op, comm.size)
    acc: torch.Tensor | None = None
    for r, b in enumerate(bufs):
        y = unpack_decode(comm, b, flat.numel(), r).to(acc_dtype(flat.dtype))
        if r == comm.rank and comm.feedback is not None:
            comm.feedback.update(comm.key, x, y)
        if acc is None:
            acc = y.clone()
        else:
            reduce_into(acc, y, op)
    assert acc is not None  # world size >= 2 here
    return average(acc, op, comm.size)


def all_reduce(
    comm: Comm,
    flat: torch.Tensor,
    op: Any,
    prepared: Prepared | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce the 1-D ``flat`` over the group; returns the result (accumulation dtype).

    ``prepared``: `prepare`'s output when the encode already ran (pipelining);
    ``out``: 1-D destination in the accumulation dtype, which may be ``flat`` itself
    (it was encoded before anything is written). Sums decode straight into it; the
    other ops and error feedback reduce in a temporary and copy it there.
    """
    p = prepared or prepare(comm, flat)
    x, buf = p.x, p.buf
    if comm.verify:  # a small packet rides with the descriptors: one round
        d = describe(comm, Gather.code, flat, [buf.numel()] * comm.size, redop=op, payload=buf)
        parts = inline(d, range(comm.size)) or allgatherv(comm, buf, d.first_sizes())
    else:
        parts = allgatherv(comm, buf, _sizes(comm, flat, x, buf, op, -1))
    acc = _reduce(comm, flat, x, parts, op, out)
    return acc if out is None or acc is out else out.copy_(acc)


def reduce(
    comm: Comm, flat: torch.Tensor, op: Any, root: int, prepared: Prepared | None = None
) -> torch.Tensor | None:
    """Like `all_reduce`, but the packets go to group rank ``root`` only; it returns the result."""
    p = prepared or prepare(comm, flat)
    x, buf = p.x, p.buf
    sizes = _sizes(comm, flat, x, buf, op, root)
    send: list[torch.Tensor | None] = [None] * comm.size
    send[root] = buf
    recv = sizes if comm.rank == root else [0] * comm.size
    bufs = alltoallv(comm, send, recv)
    if comm.rank == root:
        return _reduce(comm, flat, x, bufs, op)
    if comm.feedback is not None:
        comm.feedback.update(comm.key, x, unpack_decode(comm, buf))
    return None


#: Largest world the default choice sends whole packets to (each rank decodes
#: ``world - 1`` of them).
AUTO_MAX_WORLD = 8


@register_algorithm
class Gather(Algorithm):
    """Every rank's packet to every rank, reduced locally in rank order; module docstring."""

    name = "gather"
    code = 3
    auto_order = 1
    in_place = True

    def fits(self, codec: Codec, nbytes: int, world: int, policy: Any) -> bool:
        """Small calls on small worlds: up to ``Policy.gather_bytes`` and 8 ranks."""
        return nbytes <= policy.gather_bytes and world <= AUTO_MAX_WORLD

    def cost(
        self, nbytes: int, world: int, link: Link, speed: CodecSpeed, family: str = "all_reduce"
    ) -> float:
        """``S/enc + (N-1) * S/r / B + N * S/dec``: one round, whole packets."""
        wire = (world - 1) * nbytes / speed.ratio
        return (
            nbytes / speed.encode_Bps
            + link.seconds(wire, world - 1)
            + world * nbytes / speed.decode_Bps
        )

    all_reduce = staticmethod(all_reduce)
    reduce = staticmethod(reduce)
    prepare = staticmethod(prepare)
